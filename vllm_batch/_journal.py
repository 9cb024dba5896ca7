"""The submission journal: what `submit()` has done so far, kept in the batch's workdir next to the spool.

It is written before every step that can create something on the server, so that a create whose answer was
lost (a timeout, a dropped connection, a crash of this process) is found again instead of being made twice:
the next call, or a new process given the same `workdir` and the same requests, reuses the journal's
group tag and `Idempotency-Key`s. A server that honours the key answers with the batch it already made; for
one that ignores it, the client first looks for a batch carrying the group's metadata tags.

The journal only applies to the exact submission it was written for: its fingerprint covers the requests
(a running hash of the spool), the models, the limits, the backend and the metadata.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from openai.types import Batch

VERSION = 1


def new_key() -> str:
    return secrets.token_hex(16)


@dataclass
class Shard:
    """One server batch: a slice of the requests, for one model (target) of a comparison."""

    number: int
    target: int
    model: str | None
    count: int
    path: Path | None = None
    file_id: str | None = None
    batch_id: str | None = None
    batch: Batch | None = None
    downloads: dict[str, Path] = field(default_factory=dict)
    upload_key: str = field(default_factory=new_key)
    create_key: str = field(default_factory=new_key)
    # Unix time of the first create that was sent: from then on the batch may exist on the server.
    create_sent_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("batch")
        data.pop("downloads")
        data["path"] = str(self.path) if self.path is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Shard:
        fields = dict(data)
        fields["path"] = Path(fields["path"]) if fields.get("path") else None
        return cls(**fields)


class Journal:
    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "submission.json"

    def load(self, fingerprint: str) -> tuple[str, list[Shard]] | None:
        """The group and shards of an earlier submission of exactly these requests, if there was one."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != VERSION or data.get("fingerprint") != fingerprint:
            return None
        try:
            return str(data["group"]), [Shard.from_json(s) for s in data["shards"]]
        except (KeyError, TypeError, ValueError):
            return None  # not one we wrote: start afresh rather than trust it

    def save(self, fingerprint: str, group: str, shards: list[Shard]) -> None:
        """Atomically, and on disk before the caller goes on to the server."""
        data = {"version": VERSION, "fingerprint": fingerprint, "group": group,
                "shards": [s.to_json() for s in shards]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
