"""Requests whose prompts share a long prefix go to the engine one after another, grouped by the longest
prefix they share.

vLLM's prefix cache helps a request only if its prefix is still cached when the request is scheduled, and the
engine schedules in arrival order. A file that interleaves many long prompts (each document asked several
questions, written question by question) evicts every prefix before its next use once the prompts outgrow the
KV cache. Measured with `benchmarks.throughput` (128 documents of 500 words, two questions each, interleaved;
SmolLM2 on 2 CPU cores, 2 GiB of KV cache): in file order 0% of prompt tokens came from the cache, grouped 47%,
and the batch ran 86% faster (449 s → 242 s). When every prompt fits in the cache, grouping changes nothing
measurable.

A fixed-length key is not enough: when every prompt starts with the same long system prompt, every request
has the same key and the documents behind it are not grouped at all. So the runner reads its input in chunks
of `lookahead` requests and sorts each chunk by prompt (see `prompt_parts`). Sorted prompts are in the
depth-first order of their prefix trie: the requests that share any prefix (a system prompt, then a document
behind it, then an instruction behind that) are contiguous, at every depth, so each request runs next to the
ones it shares the longest prefix with. Then, to move nothing without a reason:

- a run of sorted requests that share their first `MIN_SHARED_CHARS` characters is a group, handed out where
  its first member is in the file, in sorted order (requests with equal prompts keep the file's order);
- every other request keeps its place in the file's order.

Only one chunk is ever in memory (its prompts are tuples of the request's own strings, not copies), and no
request is moved past the end of its chunk. The cost is a handful of C-level operations per request and the
sort's comparisons, which stop at the first differing character and, through `prompt_reader`, find a system
prompt repeated on every line equal by identity: see `benchmarks.grouping_speed` for the measured cost per
request.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, TypeVar

T = TypeVar("T")

# The shortest shared prefix worth moving a request for: about 128 tokens, one KV block of vLLM's CPU backend
# (the unit its prefix cache reuses there), eight of its 16-token GPU blocks. Requests that share less than
# this with every other request of their chunk keep the file's order.
MIN_SHARED_CHARS = 512

Prompt = tuple[str, ...]


def prompt_parts(body: dict[str, Any]) -> Prompt | None:
    """A request's prompt as the strings it is rendered from, in order, for grouping: the contents of its
    messages (chat) or its prompt (completions). Two requests whose prompts start alike have parts that start
    alike. None when there is no prompt to share (embeddings, or a body without one).

    Parts, not one joined string: joining would copy every prompt, and measured slower on every shape with
    more than one message. A tuple, not a list: cheaper to build, and the garbage collector stops tracking a
    tuple of strings. Left out, for speed: the model (a batch has one) and the roles (short, and in practice
    the same at the same position of a conversation)."""
    messages = body.get("messages")
    if messages is not None:
        try:  # the common case, at C speed: every message a dict with string content
            if len(messages) == 1:
                content = messages[0]["content"]
                if content.__class__ is str:
                    return (content,)
            parts = tuple(map(_content, messages))
            # str.startswith checks that every item of a tuple is a string (TypeError otherwise) and costs
            # less than any other such check here; it stops early only at an empty part, which is rare.
            if "".startswith(parts):
                raise TypeError("an empty part: check the rest one by one")
        except (TypeError, KeyError):
            if not isinstance(messages, list):
                return None
            parts = tuple(_text(message.get("content") if isinstance(message, dict) else message)
                          for message in messages)
        return parts
    prompt = body.get("prompt")
    if prompt is None:
        return None
    return (prompt if prompt.__class__ is str else _text(prompt),)


def prompt_reader(body_of: Callable[[T], dict[str, Any]]) -> Callable[[T], Prompt | None]:
    """`prompt_parts` of each item's body, for one pass over a batch, that also makes a first message equal
    to the previous request's (a system prompt on every line) that very string, in the body itself.

    Nothing a reader of the body can tell changes (strings are immutable and the two are equal), but a chunk
    then holds one copy of its system prompt instead of one per request, and the sort finds first parts equal
    by identity instead of comparing their characters at each of its comparisons. Measured on 1,024-request
    chunks behind a 400-word system prompt: 0.5-0.8 µs less per request than making only the prompt's first
    part the same object."""
    previous: str | None = None

    def read(item: T) -> Prompt | None:
        nonlocal previous
        body = body_of(item)
        messages = body.get("messages")
        if messages.__class__ is list and len(messages) > 1:
            first = messages[0]
            if first.__class__ is dict:
                content = first.get("content")
                if content.__class__ is str:
                    if content == previous:
                        first["content"] = previous
                    else:
                        previous = content
        return prompt_parts(body)

    return read


_content = operator.itemgetter("content")


def _text(content: Any) -> str:
    """Content that is not a plain string, rendered so that equal content renders equally."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "\n".join(part["text"] for part in content)  # text parts render as their text
    return json.dumps(content, ensure_ascii=False)  # images, audio, token ids: compared as written


def shared_at_least(a: Sequence[str], b: Sequence[str], chars: int) -> bool:
    """Whether prompts `a` and `b` start with the same `chars` characters (the boundary between two parts
    counts as one character, the same in both only where both go on)."""
    for x, y in zip(a, b):  # noqa: B905 (where the shorter ends, so does what they share)
        if x != y:
            return len(x) >= chars and len(y) >= chars and x.startswith(y[:chars])
        if len(x) >= chars:
            return True
        chars -= len(x) + 1
    return False


def group_by_prefix(items: Iterable[T], prompt: Callable[[T], Prompt | None], lookahead: int,
                    min_shared: int = MIN_SHARED_CHARS) -> Iterator[T]:
    """`items`, at most `lookahead` at a time, with those whose prompts share at least `min_shared` leading
    characters brought together and ordered by their prompts (see the module's docstring)."""
    source = iter(items)
    if lookahead <= 1:
        yield from source
        return
    while True:
        chunk: list[T] = []
        prompts: list[Prompt | None] = []
        candidates: list[int] = []  # the requests whose prompts may share enough with another's
        for item in islice(source, lookahead):  # each prompt while its request is fresh in the CPU's caches
            parts = prompt(item)
            # A one-part prompt shorter than min_shared cannot share enough with another.
            if parts and (len(parts) > 1 or len(parts[0]) >= min_shared):
                candidates.append(len(chunk))
            chunk.append(item)
            prompts.append(parts)
        if not chunk:
            return
        yield from _grouped(chunk, prompts, candidates, min_shared)


def _grouped(chunk: list[T], prompts: list[Prompt | None], candidates: list[int], min_shared: int) -> Iterator[T]:
    # Sort once, at C speed (comparisons stop at the first differing character). Requests sharing their first
    # `min_shared` characters are then adjacent runs, each already in depth-first trie order.
    candidates.sort(key=prompts.__getitem__)  # type: ignore[arg-type]  # every candidate has a prompt
    runs: dict[int, list[int]] = {}  # a run's first member in the file -> the run, in sorted order
    in_run = bytearray(len(chunk))
    start, end = 0, len(candidates)
    while start < end:
        first: Prompt = prompts[candidates[start]]  # type: ignore[assignment]
        stop = start + 1
        if len(first[0]) >= min_shared:  # the common case: the first part alone is long enough
            head = first[0][:min_shared]
            while stop < end and prompts[candidates[stop]][0].startswith(head):  # type: ignore[index]
                stop += 1
        else:
            while stop < end and shared_at_least(first, prompts[candidates[stop]], min_shared):  # type: ignore[arg-type]
                stop += 1
        if stop - start > 1:
            run = candidates[start:stop]
            runs[min(run)] = run
            for index in run:
                in_run[index] = 1
        start = stop
    for index, item in enumerate(chunk):
        if not in_run[index]:
            yield item
        elif index in runs:
            for member in runs[index]:
                yield chunk[member]
