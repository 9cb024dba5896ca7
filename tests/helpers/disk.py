"""A disk that fills up: a tiny tmpfs mounted for the test (needs root, as CI has), and a filler."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

DISK_MB = 6


@contextlib.contextmanager
def mounted_small_disk(mount: Path, size_mb: int = DISK_MB) -> Iterator[Path]:
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk; deleting the returned file gives the space back."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: a short write tells exactly when it is full
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while fh.write(b"\0" * size):
                    pass
    return filler
