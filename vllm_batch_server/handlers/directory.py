"""The `directory` result handler: copy an ended batch's files into a directory named by a template.

Options: `path`, a template such as `/srv/results/{date}/{batch_id}`, with the placeholders {batch_id},
{status}, {model}, {endpoint} (e.g. `chat_completions`), {date} (YYYY-MM-DD, UTC, when the batch ended),
{year}, {month}, {day} and {metadata[KEY]} (`-` when the batch has no such key); `files`, which of `output`,
`errors`, `input` and `batch` (the Batch object as JSON) to write (default: output, errors, batch).

Each file is written to a temporary name, fsynced and renamed into place, so a reader of the directory sees a
whole file or none, and a repeated run (at least once) replaces it with the same content. A value put into
the path never adds a directory level of its own: `/` and a leading `.` in it are replaced by `_`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import string
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vllm_batch_server.handlers import EndedBatch, HandlerConfigError
from vllm_batch_server.store.blobs import fsync_dir

FILES = ("output", "errors", "input", "batch")
PLACEHOLDERS = ("batch_id", "status", "model", "endpoint", "date", "year", "month", "day", "metadata")
ENDED_AT = ("completed_at", "failed_at", "expired_at", "cancelled_at")


def _safe(value: Any) -> str:
    text = str(value) if value not in (None, "") else "-"
    text = text.replace("/", "_").replace("\\", "_").replace("\x00", "_")
    return "_" + text[1:] if text.startswith(".") else text


class _Metadata(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "-"


def render(template: str, values: Mapping[str, Any]) -> str:
    return template.format_map(values)


def placeholders_of(batch: Mapping[str, Any]) -> dict[str, Any]:
    ended = next((batch[k] for k in ENDED_AT if batch.get(k)), None) or int(time.time())
    day = time.gmtime(ended)
    return {
        "batch_id": _safe(batch.get("id")),
        "status": _safe(batch.get("status")),
        "model": _safe(batch.get("model")),
        "endpoint": _safe(str(batch.get("endpoint", "")).removeprefix("/v1/").replace("/", "_")),
        "date": time.strftime("%Y-%m-%d", day),
        "year": time.strftime("%Y", day),
        "month": time.strftime("%m", day),
        "day": time.strftime("%d", day),
        "metadata": _Metadata({str(k): _safe(v) for k, v in (batch.get("metadata") or {}).items()}),
    }


class DirectoryHandler:
    def __init__(self, path: str, files: list[str] | tuple[str, ...] = ("output", "errors", "batch")) -> None:
        if not isinstance(path, str) or not path:
            raise HandlerConfigError("'path' must be a directory template such as /srv/results/{date}/{batch_id}")
        for _, field, _, _ in string.Formatter().parse(path):
            if field is not None and field.split("[")[0] not in PLACEHOLDERS:
                raise HandlerConfigError(f"'path' has the unknown placeholder {{{field}}}; known: "
                                         f"{', '.join(PLACEHOLDERS)}")
        if not isinstance(files, list | tuple) or not files or not all(f in FILES for f in files):
            raise HandlerConfigError(f"'files' must list some of {', '.join(FILES)}")
        try:
            render(path, placeholders_of({"id": "batch_x"}))
        except (ValueError, KeyError, IndexError) as exc:
            raise HandlerConfigError(f"'path' is not a usable template: {exc}") from None
        self._template = path
        self._files = tuple(files)

    def target(self, batch: EndedBatch) -> Path:
        return Path(render(self._template, placeholders_of(batch.batch))).expanduser()

    def handle(self, batch: EndedBatch) -> None:
        directory = self.target(batch)
        directory.mkdir(parents=True, exist_ok=True)
        sources = {"output": batch.output_path, "errors": batch.error_path, "input": batch.input_path}
        for kind in self._files:
            if kind == "batch":
                data = json.dumps(batch.batch, indent=2).encode() + b"\n"
                self._write(directory / "batch.json", lambda out, data=data: out.write(data))
                continue
            source = sources[kind]
            if source is None:
                continue
            self._write(directory / f"{kind}.jsonl", lambda out, source=source: self._copy(source, out))
        fsync_dir(directory)

    @staticmethod
    def _copy(source: Path, out: Any) -> None:
        with open(source, "rb") as fh:
            shutil.copyfileobj(fh, out, 1 << 20)

    @staticmethod
    def _write(target: Path, fill: Any) -> None:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
