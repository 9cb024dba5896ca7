"""`python -m tests.helpers.colliding_ids serve ...`: the server, with custom_ids hashed so that they collide.

A test seam, not a mock: `custom_ids.custom_id_hash` is the one function the server hashes custom_ids with, and
here ids of the same length share a hash, so validation and every resume take the paths that compare the ids
themselves (with the real hash they would practically never run).
"""

from __future__ import annotations

from vllm_batch_server.cli import main
from vllm_batch_server.queue import custom_ids


def colliding_hash(custom_id: str) -> int:
    return len(custom_id)


if __name__ == "__main__":
    custom_ids.custom_id_hash = colliding_hash
    main()
