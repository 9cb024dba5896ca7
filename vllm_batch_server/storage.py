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
import errno
import os
import secrets
import shutil
import sqlite3
from pathlib import Path
from typing import BinaryIO

from vllm_batch_server.ids import is_batch_id, is_file_id

CHUNK = 1024 * 1024


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"file exceeds the {limit}-byte limit")
        self.limit = limit


def is_disk_full(exc: BaseException) -> bool:
    """A write failed for lack of space (or quota), on a blob or inside SQLite: the operator's to fix, and
    nothing committed is lost, so callers get a 507 and running batches pause instead of failing."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Upload:
    """An upload being streamed to a private temporary file; `commit` publishes it under a file id."""

    def __init__(self, storage: Storage, limit: int) -> None:
        self._storage = storage
        self._limit = limit
        self.path = storage.tmp_dir / f"upload-{secrets.token_hex(8)}"
        self._fh: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in commit/discard
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._fh is not None
        self.size += len(data)
        if self.size > self._limit:
            raise TooLarge(self._limit)
        self._fh.write(data)

    async def commit(self, file_id: str) -> None:
        fh, self._fh = self._fh, None
        assert fh is not None
        await asyncio.to_thread(self._storage.publish, fh, self.path, self._storage.file_path(file_id))

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)


class Storage:
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

    def new_upload(self, limit: int) -> Upload:
        return Upload(self, limit)

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

    def open_parts(self, batch_id: str, output_offset: int, error_offset: int) -> tuple[BinaryIO, BinaryIO]:
        """Open both result parts for appending, first cutting off anything past the committed offsets:
        bytes written after the last checkpoint belong to results that will be computed again."""
        directory = self.batch_dir(batch_id)
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        handles = []
        for path, offset in zip(self.part_paths(batch_id), (output_offset, error_offset), strict=True):
            fh = open(path, "ab")  # noqa: SIM115 - the runner owns and closes them
            if fh.seek(0, os.SEEK_END) < offset:
                fh.close()
                raise OSError(f"{path} is shorter than its committed {offset} bytes: results were lost on disk")
            fh.truncate(offset)
            fh.seek(offset)
            handles.append(fh)
        if created:
            fsync_dir(self.batches_dir)
        return handles[0], handles[1]

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
