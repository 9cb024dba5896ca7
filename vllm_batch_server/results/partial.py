"""Reading a batch's committed result lines by line number, while it runs and after it ended.

Only committed lines are ever read: while a batch runs, its parts under `batches/<id>/` are read up to the
byte offsets SQLite records (checkpoint.py commits them only after the bytes were fsynced, and they only
grow), never to the end of the file, where lines a crash would take back may sit. Once the batch ended, its
registered output and error files are whole.

Finalizing renames a part into its registered file at any moment. A part is opened before any byte is read
and then read through that descriptor, so a rename (or the batch directory's removal) mid-read changes
nothing; a part that is already gone when we look is found under the file id that finalizing chose before
renaming anything.

A reader continuing from line N should not rescan the N lines before it each time: `LineIndex` remembers the
byte offset of the lines that answers ended on (and of every `STRIDE`-th line scanned), per batch and kind,
within a bounded memory. The bytes of a committed line never move (resume cuts a part back only to its
committed offset, and the registered file is that same prefix), so a remembered offset stays true.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from vllm_batch_server.statuses import TERMINAL, BatchStatus
from vllm_batch_server.store.blobs import Blobs
from vllm_batch_server.store.database import Database

Kind = Literal["output", "errors"]

CHUNK = 256 * 1024
STRIDE = 4096  # while scanning, remember every this-many-th line's offset too
POINTS_PER_FILE = 64
FILES_REMEMBERED = 1024


class ResultsGone(Exception):
    """The batch ended, but its result file was deleted (by its owner, or when it expired)."""

    def __init__(self, file_id: str) -> None:
        super().__init__(file_id)
        self.file_id = file_id


class TryAgain(Exception):
    """The batch moved under us more than a few times in a row (it should not: finalizing renames once)."""


class LineIndex:
    """Remembered (line number → byte offset) points per (batch, kind), least recently used forgotten first."""

    def __init__(self, files: int = FILES_REMEMBERED, points: int = POINTS_PER_FILE) -> None:
        self._files: OrderedDict[tuple[str, str], tuple[list[int], list[int]]] = OrderedDict()
        self._max_files = files
        self._max_points = points

    def nearest(self, key: tuple[str, str], line: int, limit: int) -> tuple[int, int]:
        """The remembered point at or before `line` whose offset lies within `limit` bytes; (0, 0) if none."""
        found = self._files.get(key)
        if found is None:
            return 0, 0
        self._files.move_to_end(key)
        lines, offsets = found
        at = bisect.bisect_right(lines, line) - 1
        while at >= 0 and offsets[at] > limit:
            at -= 1
        return (lines[at], offsets[at]) if at >= 0 else (0, 0)

    def remember(self, key: tuple[str, str], line: int, offset: int) -> None:
        if line <= 0:
            return
        found = self._files.get(key)
        if found is None:
            found = self._files[key] = ([], [])
        self._files.move_to_end(key)
        while len(self._files) > self._max_files:
            self._files.popitem(last=False)
        lines, offsets = found
        at = bisect.bisect_left(lines, line)
        if at < len(lines) and lines[at] == line:
            return
        lines.insert(at, line)
        offsets.insert(at, offset)
        if len(lines) > self._max_points:
            # Readers move forward: the earliest points are the least likely to be asked for again.
            del lines[0], offsets[0]


@dataclass
class LineRange:
    """Lines [first, next_line) of a result file: bytes [start, end) of an open descriptor."""

    fd: int | None
    start: int
    end: int
    first: int
    next_line: int
    status: BatchStatus

    def chunks(self) -> Iterator[bytes]:
        """The bytes, read in chunks (blocking: run it off the event loop); closes the descriptor."""
        try:
            position = self.start
            while self.fd is not None and position < self.end:
                data = os.pread(self.fd, min(CHUNK, self.end - position), position)
                if not data:
                    raise OSError(f"a committed result file ended early at byte {position} of {self.end}")
                position += len(data)
                yield data
        finally:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


class CommittedResults:
    def __init__(self, db: Database, blobs: Blobs) -> None:
        self._db = db
        self._blobs = blobs
        self.index = LineIndex()

    async def open(self, batch_id: str, kind: Kind) -> tuple[int | None, int, BatchStatus]:
        """(descriptor or None when there is nothing yet, committed size in bytes, status) of one result file.
        Raises ResultsGone when an ended batch's file was deleted."""
        for _ in range(5):
            batch = await self._db.get_batch(batch_id)
            if batch is None:
                raise KeyError(batch_id)
            file_id = batch.output_file_id if kind == "output" else batch.error_file_id
            if batch.status in TERMINAL:
                if file_id is None:
                    return None, 0, batch.status
                try:
                    fd = os.open(self._blobs.file_path(file_id), os.O_RDONLY)
                except FileNotFoundError:
                    raise ResultsGone(file_id) from None
                return fd, os.fstat(fd).st_size, batch.status
            committed = batch.output_offset if kind == "output" else batch.error_offset
            if committed == 0:
                return None, 0, batch.status
            part = self._blobs.part_paths(batch.id)[0 if kind == "output" else 1]
            try:
                return os.open(part, os.O_RDONLY), committed, batch.status
            except FileNotFoundError:
                pass
            if file_id is not None:  # finalizing renamed the part into its file: the same bytes
                try:
                    return os.open(self._blobs.file_path(file_id), os.O_RDONLY), committed, batch.status
                except FileNotFoundError:
                    pass
            # Renamed and then deleted, or between two steps of finalizing: look at the batch again.
        raise TryAgain(batch_id)

    def locate(self, batch_id: str, kind: Kind, fd: int | None, size: int, status: BatchStatus,
               after_line: int, limit: int) -> LineRange:
        """Find lines (after_line, after_line + limit] within the first `size` bytes (blocking)."""
        key = (batch_id, kind)
        if fd is None or size == 0:
            return LineRange(None, 0, 0, after_line, after_line, status)
        line, offset = self.index.nearest(key, after_line, size)
        try:
            line, offset = self._skip(key, fd, line, offset, after_line, size)
            if line < after_line:  # fewer lines than that so far: nothing to give yet
                return LineRange(fd, offset, offset, after_line, after_line, status)
            start = offset
            line, offset = self._skip(key, fd, line, offset, after_line + limit, size)
        except BaseException:
            os.close(fd)
            raise
        self.index.remember(key, after_line, start)
        self.index.remember(key, line, offset)
        return LineRange(fd, start, offset, after_line, line, status)

    def _skip(self, key: tuple[str, str], fd: int, line: int, offset: int, target: int,
              size: int) -> tuple[int, int]:
        """Move from (line, offset) past whole lines until `target` lines or `size` bytes are behind."""
        while line < target and offset < size:
            data = os.pread(fd, min(CHUNK, size - offset), offset)
            if not data:
                break
            count = data.count(b"\n")
            if count and line + count < target:  # the whole chunk lies before the target: skip it at once
                before = line
                line += count
                offset += data.rfind(b"\n") + 1
                if line // STRIDE > before // STRIDE:
                    self.index.remember(key, line, offset)
                continue
            at = 0
            while line < target:
                newline = data.find(b"\n", at)
                if newline < 0:
                    break
                at = newline + 1
                line += 1
            if line < target and at == 0 and len(data) == CHUNK:
                # One line longer than a chunk: look for its end further on.
                end = self._line_end(fd, offset + len(data), size)
                if end is None:
                    break
                offset, line = end, line + 1
                continue
            if at == 0:
                break  # only a torn tail is left (never the case below a committed offset)
            offset += at
        return line, offset

    @staticmethod
    def _line_end(fd: int, position: int, size: int) -> int | None:
        while position < size:
            data = os.pread(fd, min(CHUNK, size - position), position)
            if not data:
                return None
            newline = data.find(b"\n")
            if newline >= 0:
                return position + newline + 1
            position += len(data)
        return None
