"""Argument types for the CLI's numeric options: a bad value (`-3`, `abc`, `nan`) is a usage error (exit status 2,
with the option named) when the command line is read, never a traceback from somewhere deeper."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole(minimum: int) -> Callable[[str], int]:
    """A whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}")
        return value

    parse.__name__ = "whole number"
    return parse


def number(minimum: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """A finite number; with `minimum`, at least it (`above`: more than it)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if above else value < minimum):
            bound = f"more than {minimum:g}" if above else f"at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


seconds = number(0)
interval = number(0, above=True)
