"""The progress bar of `wait()`: request rate, tokens per second and an ETA measured from what the polls saw.

Rates come only from changes between polls, never from counts a batch had before we started watching (a batch
resumed at 90 % has not done 90 % in the first second), and a stretch with no change at the start (a model
loading, a queue) is left out of the rate once requests start to finish.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from vllm_batch._status import BatchStatus

RATE_WINDOW = 300.0  # seconds of history the rates are measured over


class ProgressMeter:
    def __init__(self) -> None:
        self._points: deque[tuple[float, int, int | None]] = deque()

    def observe(self, when: float, done: int, tokens: int | None) -> None:
        points = self._points
        points.append((when, done, tokens))
        # Before the first change, only the latest unchanged point matters: it bounds when work started.
        while len(points) >= 2 and points[0][1] == points[1][1]:
            points.popleft()
        while len(points) > 2 and when - points[1][0] >= RATE_WINDOW:
            points.popleft()

    def _span(self) -> tuple[float, int, int | None] | None:
        if len(self._points) < 2:
            return None
        (t0, d0, k0), (t1, d1, k1) = self._points[0], self._points[-1]
        if t1 <= t0:
            return None
        return t1 - t0, d1 - d0, (k1 - k0) if k0 is not None and k1 is not None else None

    @property
    def rate(self) -> float | None:
        """Requests per second, or None until two polls are apart in time."""
        span = self._span()
        return max(span[1], 0) / span[0] if span else None

    @property
    def tokens_per_second(self) -> float | None:
        span = self._span()
        return max(span[2], 0) / span[0] if span and span[2] is not None else None

    def eta(self, total: int) -> float | None:
        rate = self.rate
        if not rate or not self._points:
            return None
        return max(total - self._points[-1][1], 0) / rate


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe(status: BatchStatus, meter: ProgressMeter, hint: str | None = None) -> str:
    """The text after the bar: status, then rates and ETA, or why nothing moves yet."""
    counts = status.request_counts
    parts = [status.status]
    if counts.failed:
        parts.append(f"{counts.failed} failed")
    if hint and not status.done:
        parts.append(hint)
    elif not status.done:
        rate, tokens, eta = meter.rate, meter.tokens_per_second, meter.eta(counts.total)
        if rate is not None:
            parts.append(f"{rate:.3g} req/s")
        if tokens is not None:
            parts.append(f"{tokens:,.0f} tok/s")
        if eta is not None:
            parts.append(f"ETA {_clock(eta)}")
    return ", ".join(parts)


class ProgressBar:
    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled = enabled
        self.desc = desc
        self.bar: Any = None

    def update(self, status: BatchStatus, meter: ProgressMeter, hint: str | None = None) -> None:
        if not self.enabled:
            return
        counts = status.request_counts
        if self.bar is None:
            from tqdm.auto import tqdm

            # Our own rates and ETA in the postfix: tqdm's would count what was done before we looked.
            self.bar = tqdm(total=counts.total or None, initial=counts.done, desc=self.desc, unit="req",
                            dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        if counts.total and self.bar.total != counts.total:
            self.bar.total = counts.total
        self.bar.n = counts.done
        self.bar.set_postfix_str(describe(status, meter, hint), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
