"""Which engine already holds a prompt's prefix in its cache: prefix affinity for the router.

vLLM (and SGLang) keep the KV cache of recent prompts and reuse it for any later prompt that starts the same
way. Across several engines that only pays if prompts sharing a prefix go to the same engine. So the router
remembers, for the prompts it sent, which engines got which prefix, and prefers those engines for the next
prompt that starts the same way.

A prompt is cut into CHUNK_CHARS-character chunks and each chunk gets a hash chained over the chunks before
it (as vLLM hashes its KV blocks), so two prompts share their first k chunk hashes exactly when they share
their first k chunks. The table maps a chunk hash to the set of engines (a bit mask) that were sent a prompt
with it; the deepest chunk of a prompt that some engine holds is the longest prefix that engine can reuse.
A prefix every engine holds (a common system prompt) says nothing about where to go, so such a prompt is free
to go anywhere. The table is bounded (least recently used chunks are forgotten).

The prompt text is read as grouping.py reads it for the runner's prefix grouping (message contents joined by
a NUL, or the completion prompt), so what the runner puts together the router keeps together.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

# About 60 tokens: fine enough to tell documents apart, coarse enough to keep the table small.
CHUNK_CHARS = 256
# Prompts are hashed this far at most (16k characters); a longer shared prefix is already worth keeping.
MAX_CHUNKS = 64
# Chunk hashes remembered: about 15 MB, enough for the thousands of prompts in flight and just sent.
TABLE_SIZE = 100_000


def prompt_text(body: dict[str, Any]) -> str:
    """The text a request's prompt starts with, as far as MAX_CHUNKS chunks need (a conversation can be long)."""
    limit = CHUNK_CHARS * MAX_CHUNKS
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for message in messages:
            part = _text(message.get("content")) if isinstance(message, dict) else ""
            parts.append(part)
            size += len(part) + 1
            if size > limit:
                break
        return "\x00".join(parts)[:limit]
    return _text(body.get("prompt"))[:limit]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return json.dumps(content, ensure_ascii=False)  # content parts, token ids: compared as written


def prompt_chunks(body: dict[str, Any]) -> list[int]:
    """The chained hashes of the prompt's whole chunks (a prompt shorter than one chunk has none: too short
    for its cache to matter)."""
    text = prompt_text(body)
    hashes: list[int] = []
    previous = hash(str(body.get("model")))
    for start in range(0, len(text) - CHUNK_CHARS + 1, CHUNK_CHARS):
        previous = hash((previous, text[start:start + CHUNK_CHARS]))
        hashes.append(previous)
    return hashes


class AffinityTable:
    def __init__(self, size: int = TABLE_SIZE) -> None:
        self._size = size
        self._holders: OrderedDict[int, int] = OrderedDict()  # chunk hash -> bit mask of engine indexes

    def __len__(self) -> int:
        return len(self._holders)

    def preferred(self, chunks: list[int], live: int) -> int:
        """The engines (bit mask) holding the longest prefix of this prompt that not every live engine holds;
        0 when no engine holds any of it, or every engine holds all of it that any does."""
        for chunk in reversed(chunks):
            holders = self._holders.get(chunk, 0) & live
            if holders:
                return 0 if holders == live else holders
        return 0

    def record(self, chunks: list[int], engine: int) -> None:
        bit = 1 << engine
        holders = self._holders
        for chunk in chunks:
            holders[chunk] = holders.get(chunk, 0) | bit
            holders.move_to_end(chunk)
        while len(holders) > self._size:
            holders.popitem(last=False)

    def forget(self, engine: int) -> None:
        """An engine restarted with an empty cache: it holds nothing any more."""
        mask = ~(1 << engine)
        for chunk, holders in list(self._holders.items()):
            remaining = holders & mask
            if remaining:
                self._holders[chunk] = remaining
            else:
                del self._holders[chunk]
