"""Blobs on disk: uploaded files, batch result parts, and the moves that make them durable.

Layout under the data directory:

    files/<file-id>               every registered file (uploads and batch outputs), immutable once there
    tmp/                          uploads being received; emptied at start-up
    batches/<batch-id>/*.part     results being appended while a batch runs

A file becomes visible only by `rename` after its bytes were fsynced, and the rename itself is made durable
by fsyncing the directory, so a crash leaves either nothing or a whole file, never a torn one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO

from vllm_batch_server.ids import is_batch_id, is_file_id

CHUNK = 1024 * 1024


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"file exceeds the {limit}-byte limit")
        self.limit = limit


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Upload:
    """An upload being streamed to a private temporary file; `commit` publishes it under a file id."""

    def __init__(self, blobs: Blobs, limit: int, *, digest: bool = False) -> None:
        self._blobs = blobs
        self._limit = limit
        self.path = blobs.tmp_dir / f"upload-{secrets.token_hex(8)}"
        self._fh: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in commit/discard
        self.size = 0
        # Only when asked (an Idempotency-Key came with it): hashing costs a little on every byte.
        self._digest = hashlib.sha256() if digest else None

    def write(self, data: bytes) -> None:
        assert self._fh is not None
        self.size += len(data)
        if self.size > self._limit:
            raise TooLarge(self._limit)
        self._fh.write(data)
        if self._digest is not None:
            self._digest.update(data)

    @property
    def sha256(self) -> str | None:
        return self._digest.hexdigest() if self._digest is not None else None

    async def commit(self, file_id: str) -> None:
        fh, self._fh = self._fh, None
        assert fh is not None
        await asyncio.to_thread(self._blobs.publish, fh, self.path, self._blobs.file_path(file_id))

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)


class ResultPart:
    """One result part opened for appending, with a buffer of our own instead of Python's.

    A buffered file object flushes whatever it holds when it is closed or garbage-collected, even after a
    write failed: a part whose flush hit a full disk would later spill old lines behind the lines of the run
    that resumed the batch, duplicating results (seen: error files with lines twice). Here bytes reach the
    file only through `flush()`, and once a flush fails the part is broken for good: nothing more is ever
    written through it, and `close()` never writes.
    """

    # Written out even between snapshots (checkpointing off, or a very fast engine), so memory stays flat.
    MAX_BUFFER = 1 << 20

    def __init__(self, path: Path, offset: int) -> None:
        self.name = str(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if os.fstat(self._fd).st_size < offset:
                raise OSError(f"{path} is shorter than its committed {offset} bytes: results were lost on disk")
            os.ftruncate(self._fd, offset)
        except BaseException:
            os.close(self._fd)
            raise
        self._written = offset  # bytes handed to the kernel
        self._buffer = bytearray()
        self._broken: BaseException | None = None

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        """The part's size once everything written so far is flushed."""
        return self._written + len(self._buffer)

    def write(self, data: bytes) -> None:
        if self._broken is not None:
            raise self._unusable()
        self._buffer += data
        if len(self._buffer) >= self.MAX_BUFFER:
            self.flush()

    def flush(self) -> None:
        if self._broken is not None:
            raise self._unusable()
        view = memoryview(self._buffer)
        try:
            while view:
                count = os.write(self._fd, view)
                self._written += count
                view = view[count:]
        except BaseException as exc:
            # What reached the file is past the committed offset and will be cut off on resume; what did
            # not must never follow it.
            self._broken = exc
            raise
        finally:
            view.release()
            self._buffer.clear()  # written, or never to be written

    def _unusable(self) -> OSError:
        # Same errno as the first failure, so callers still see what ran out (a full disk pauses the batch).
        cause = self._broken
        code = cause.errno if isinstance(cause, OSError) else None
        error = OSError(code, f"an earlier write to {self.name} failed: {cause}")
        error.__cause__ = cause
        return error

    def close(self) -> None:
        """Close without writing: results not flushed by a checkpoint are not committed anyway."""
        if self._fd >= 0:
            self._buffer.clear()
            os.close(self._fd)
            self._fd = -1


class Blobs:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.files_dir = data_dir / "files"
        self.tmp_dir = data_dir / "tmp"
        self.batches_dir = data_dir / "batches"

    def prepare(self) -> None:
        # Users' prompts and results live here: readable by the server's user only.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for directory in (self.files_dir, self.tmp_dir, self.batches_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
        # Whatever was being received when the server stopped was never acknowledged: drop it.
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    # ---- files -------------------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        if not is_file_id(file_id):  # the API checks first; this keeps the disk safe whatever the caller
            raise ValueError(f"not a file id: {file_id!r}")
        return self.files_dir / file_id

    def new_upload(self, limit: int, *, digest: bool = False) -> Upload:
        return Upload(self, limit, digest=digest)

    @staticmethod
    def publish(fh: BinaryIO, source: Path, target: Path) -> None:
        """fsync `fh` (open on `source`), close it, and atomically move it to `target`."""
        try:
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()
        os.replace(source, target)
        fsync_dir(target.parent)

    def remove_file(self, file_id: str) -> None:
        self.file_path(file_id).unlink(missing_ok=True)

    def stored_file_ids(self) -> set[str]:
        return {p.name for p in self.files_dir.iterdir() if is_file_id(p.name)}

    # ---- batch result parts ------------------------------------------------------------------------------

    def batch_dir(self, batch_id: str) -> Path:
        if not is_batch_id(batch_id):
            raise ValueError(f"not a batch id: {batch_id!r}")
        return self.batches_dir / batch_id

    def part_paths(self, batch_id: str) -> tuple[Path, Path]:
        directory = self.batch_dir(batch_id)
        return directory / "output.jsonl.part", directory / "errors.jsonl.part"

    def open_parts(self, batch_id: str, output_offset: int, error_offset: int) -> tuple[ResultPart, ResultPart]:
        """Open both result parts for appending, first cutting off anything past the committed offsets:
        bytes written after the last checkpoint belong to results that will be computed again."""
        directory = self.batch_dir(batch_id)
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        parts: list[ResultPart] = []
        try:
            for path, offset in zip(self.part_paths(batch_id), (output_offset, error_offset), strict=True):
                parts.append(ResultPart(path, offset))
        except BaseException:
            for part in parts:
                part.close()
            raise
        if created:
            fsync_dir(self.batches_dir)
        return parts[0], parts[1]

    def promote_part(self, part: Path, offset: int, file_id: str) -> int:
        """Make the committed prefix of a result part the registered file `file_id`; returns its size.

        Idempotent, so finalizing can be repeated after a crash: if the part is gone, the rename already
        happened and the file is there.
        """
        target = self.file_path(file_id)
        if part.exists():
            with open(part, "r+b") as fh:
                fh.truncate(offset)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(part, target)
            fsync_dir(target.parent)
        return target.stat().st_size

    def remove_batch_dir(self, batch_id: str) -> None:
        shutil.rmtree(self.batch_dir(batch_id), ignore_errors=True)
