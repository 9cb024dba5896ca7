"""Which custom_ids repeat in an input file, and which input lines already have a committed result: exactly, in
memory that does not grow with the batch (docs/performance.md, "Batches of millions of lines").

Both questions were answered with a Python set of every custom_id, about 90 bytes a line (948 MiB at 10
million lines). Here each id becomes a 64-bit hash, and the hashes, with the number of their line, are thrown
into partitions by their low bits on an anonymous temporary file; each partition is then read back and
answered on its own, so memory holds one partition (a few MB) and a small buffer per partition, however long
the file. Equal hashes are only candidates: duplicates are confirmed by comparing the ids themselves, read
again from their lines, and a committed id is matched to its input line through the hash only when no other
input line has that hash (a committed id is always one of the input's ids, which validation made unique);
when two input lines share a hash, the ids are compared instead. So a hash collision costs time, never
correctness: tests force them with `custom_id_hash` set to a function that collides.
"""

from __future__ import annotations

import heapq
import os
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vllm_batch_server.store.jsonl import iter_raw_lines, loads

# A custom_id's 64-bit hash. Python's own string hash is the fastest there is here, and nothing hashed outlives
# the process; it is SipHash keyed per process, so a file cannot be crafted to collide (unless PYTHONHASHSEED
# fixes the key: collisions then cost time, never correctness). A test seam: tests replace it with a function
# that collides, so that the confirmation paths run.
custom_id_hash: Callable[[str], int] = hash

# Values (hash, line) buffered per partition before they go to the file: 8 KiB, header included.
_BUFFER_VALUES = 1024
_HEADER = 2  # each chunk on the file starts with (offset of the partition's previous chunk, values in it)


def partitions_for(size: int) -> int:
    """How many partitions for an input of `size` bytes: one per 16 MiB of input (a power of two, 1 to 4,096),
    so that one partition holds some 40,000-200,000 lines and the buffers at most 32 MiB."""
    wanted = max(1, -(-size // (16 << 20)))
    return min(4096, 1 << (wanted - 1).bit_length())


class HashSpill:
    """(hash, value) pairs of 64-bit integers, kept by partition (the hash's low bits) on a temporary file.

    Memory: one buffer of `_BUFFER_VALUES` per partition. The file is created at the first full buffer (small
    inputs never touch the disk) and unnamed (O_TMPFILE), so a crash leaves nothing behind. Each chunk written
    names the previous chunk of its partition, so reading a partition back follows that chain from its last
    chunk: no index of chunks grows in memory.
    """

    def __init__(self, directory: Path | None, partitions: int) -> None:
        if partitions & (partitions - 1):
            raise ValueError("partitions must be a power of two")
        self.partitions = partitions
        self._mask = partitions - 1
        self._directory = directory
        self._buffers = [array("q", (-1, 0)) for _ in range(partitions)]
        self._last = [-1] * partitions  # file offset of each partition's newest chunk
        self._file: IO[bytes] | None = None
        self._size = 0

    def add(self, key: int, value: int) -> None:
        buffer = self._buffers[key & self._mask]
        buffer.append(key)
        buffer.append(value)
        if len(buffer) >= _BUFFER_VALUES:
            self._flush(key & self._mask)

    def _flush(self, index: int) -> None:
        buffer = self._buffers[index]
        if self._file is None:
            # O_TMPFILE where the filesystem has it: the file has no name, so nothing outlives the process.
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix="custom-ids-")  # noqa: SIM115
        buffer[0] = self._last[index]
        buffer[1] = len(buffer) - _HEADER
        self._last[index] = self._size
        self._size += self._file.write(buffer.tobytes())
        del buffer[_HEADER:]

    def partition(self, index: int) -> array[int]:
        """Every (hash, value) of one partition, flat: hashes at even positions, their values after them."""
        buffer = self._buffers[index]
        found = array("q", buffer[_HEADER:])
        offset = self._last[index]
        if offset >= 0:
            assert self._file is not None
            self._file.flush()
            fd = self._file.fileno()
            while offset >= 0:
                header = array("q", os.pread(fd, 8 * _HEADER, offset))
                found.frombytes(os.pread(fd, 8 * header[1], offset + 8 * _HEADER))
                offset = header[0]
        return found

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> HashSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pairs(values: array[int]) -> Iterator[tuple[int, int]]:
    return zip(values[0::2], values[1::2])  # noqa: B905 - an even length by construction


class LineSet:
    """A set of line numbers, one bit per line up to the largest: 1.25 MB for 10 million lines."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, line: int) -> None:
        byte = line >> 3
        if byte >= len(self._bits):
            # Grown by half again at least, so that adding lines in order costs amortized constant time.
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits) // 2, 4096)))
        self._bits[byte] |= 1 << (line & 7)

    def __contains__(self, line: object) -> bool:
        if not isinstance(line, int):
            return False
        byte = line >> 3
        return 0 <= byte < len(self._bits) and bool(self._bits[byte] >> (line & 7) & 1)

    def __len__(self) -> int:
        return int.from_bytes(self._bits, "little").bit_count()

    def __iter__(self) -> Iterator[int]:
        for byte, bits in enumerate(self._bits):
            if bits:
                for bit in range(8):
                    if bits >> bit & 1:
                        yield byte * 8 + bit


# ---- duplicates (validation) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Duplicate:
    line: int  # a line whose custom_id an earlier line already has
    first: int  # the first line with that custom_id
    custom_id: str


class DuplicateFinder:
    """Validation's half: `add` every line's custom_id while streaming the file, then ask `duplicates`."""

    def __init__(self, input_size: int, scratch: Path | None = None,
                 hash_id: Callable[[str], int] | None = None) -> None:
        self._hash = hash_id if hash_id is not None else custom_id_hash
        self._spill = HashSpill(scratch, partitions_for(input_size))

    def add(self, custom_id: str, line: int) -> None:
        self._spill.add(self._hash(custom_id), line)

    def close(self) -> None:
        self._spill.close()

    def __enter__(self) -> DuplicateFinder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def duplicates(self, path: Path, limit: int) -> list[Duplicate]:
        """The first `limit` lines, in line order, whose custom_id an earlier line has: exact.

        Repeated hashes are only candidates. The `keep` repeated hashes whose second line comes first are
        checked by reading their lines' ids (their first `keep` + 1 lines each); what that cannot decide
        (collisions took the places of real duplicates) is tried again with four times the room.
        """
        if limit <= 0:
            return []
        keep = limit
        while True:
            found, exact_below = self._check(path, limit, keep)
            settled = [d for d in found if d.line < exact_below]
            if len(settled) >= limit or exact_below == _NO_BOUND:
                return settled[:limit]
            keep *= 4

    def _check(self, path: Path, limit: int, keep: int) -> tuple[list[Duplicate], int]:
        """The duplicates among the lines of the `keep` repeated hashes whose second line comes first, and the
        line below which that list is complete."""
        spill = self._spill
        # Max-heap by (second line, hash) of the `keep` smallest: entries are negated.
        candidates: list[tuple[int, int]] = []
        dropped_from: tuple[int, int] | None = None  # the smallest (second line, hash) left out
        for index in range(spill.partitions):
            values = spill.partition(index)
            keys = values[0::2]
            if len(set(keys)) == len(keys):  # the common case, at C speed: no hash twice in this partition
                continue
            first: dict[int, int] = {}
            second: dict[int, int] = {}
            for key, line in _pairs(values):
                earlier = first.get(key)
                if earlier is None:
                    first[key] = line
                    continue
                if line < earlier:
                    first[key], line = line, earlier
                if line < second.get(key, line + 1):
                    second[key] = line
            for key, line in second.items():
                entry = (-line, -key)
                if len(candidates) < keep:
                    heapq.heappush(candidates, entry)
                    continue
                if entry > candidates[0]:
                    entry = heapq.heapreplace(candidates, entry)
                if dropped_from is None or (-entry[0], -entry[1]) < dropped_from:
                    dropped_from = (-entry[0], -entry[1])
        if not candidates:
            return [], _NO_BOUND
        exact_below = dropped_from[0] if dropped_from is not None else _NO_BOUND

        # The lines of the kept hashes: their keep + 1 smallest each (a repeated id's later lines beyond those
        # cannot be among the first `limit` duplicates).
        kept = {-key for _, key in candidates}
        lines: dict[int, list[int]] = {key: [] for key in kept}  # max-heaps of negated lines
        for index in sorted({key & (spill.partitions - 1) for key in kept}):
            for key, line in _pairs(spill.partition(index)):
                heap = lines.get(key)
                if heap is None:
                    continue
                if len(heap) <= keep:
                    heapq.heappush(heap, -line)
                elif -line > heap[0]:
                    dropped = -heapq.heapreplace(heap, -line)
                    exact_below = min(exact_below, dropped)
                else:
                    exact_below = min(exact_below, line)
        wanted = sorted(-line for heap in lines.values() for line in heap)

        # Compare the ids themselves, in line order: the first line of each id is not a duplicate.
        first_line: dict[str, int] = {}
        found: list[Duplicate] = []
        for line, custom_id in _ids_on_lines(path, wanted):
            earlier = first_line.setdefault(custom_id, line)
            if earlier != line:
                found.append(Duplicate(line, earlier, custom_id))
                if len(found) >= limit and found[-1].line < exact_below:
                    break
        return found, exact_below


_NO_BOUND = 1 << 62


def _ids_on_lines(path: Path, lines: list[int]) -> Iterator[tuple[int, str]]:
    """(line, custom_id) of the given lines (sorted), reading the file once up to the last of them."""
    if not lines:
        return
    wanted = iter(lines)
    target = next(wanted)
    for number, raw in iter_raw_lines(path):
        if number < target:
            continue
        yield number, input_custom_id(raw)
        target = next(wanted, -1)
        if target < 0:
            return


# ---- lines already done (resume) -------------------------------------------------------------------------

_FAST_KEYS = (b'{"custom_id":"', b'{"custom_id": "')


def input_custom_id(raw: bytes) -> str:
    """The custom_id of a request line that passed validation: parsed only when it must be.

    Lines that start with the key (`{"custom_id":"...` or `{"custom_id": "...`, as json.dumps writes a dict
    built in that order) are cut at the closing quote. That is exact when the line has no backslash (no escape
    can hide a quote, or spell the key differently) and names the key once (JSON's last duplicate key would
    win): otherwise the line is parsed.
    """
    if raw.startswith(_FAST_KEYS) and b"\\" not in raw and raw.count(b'"custom_id"') == 1:
        start = 14 if raw[13] == 34 else 15  # 34: the opening quote right after the colon
        return raw[start:raw.find(b'"', start)].decode()
    custom_id: str = loads(raw)["custom_id"]
    return custom_id


def lines_done(input_path: Path, committed: Callable[[], Iterable[str]], scratch: Path | None = None,
               hash_id: Callable[[str], int] | None = None) -> LineSet:
    """The input lines whose custom_id has a committed result, given the committed ids (a callable, since a
    hash collision means reading them twice). Reads the input once when anything is committed."""
    hash_of = hash_id if hash_id is not None else custom_id_hash
    done = LineSet()
    ids = iter(committed())
    first = next(ids, None)
    if first is None:  # a batch starting afresh
        return done
    partitions = partitions_for(input_path.stat().st_size)
    with HashSpill(scratch, partitions) as results, HashSpill(scratch, partitions) as inputs:
        results.add(hash_of(first), 0)
        for custom_id in ids:
            results.add(hash_of(custom_id), 0)
        for line, raw in iter_raw_lines(input_path):
            inputs.add(hash_of(input_custom_id(raw)), line)

        # Per partition: an input line whose hash is a committed id's is that id's line, unless another input
        # line has the same hash (then the ids decide, below).
        shared: dict[int, list[int]] = {}  # hash -> the input lines that share it
        for index in range(partitions):
            hashes = set(results.partition(index)[0::2])
            if not hashes:
                continue
            values = inputs.partition(index)
            line_of = dict(_pairs(values))  # at C speed; a hash on two input lines keeps one of them here
            if len(line_of) < len(values) // 2:
                for key, line in _pairs(values):
                    if key in hashes and line_of[key] != line:
                        shared.setdefault(key, [line_of[key]]).append(line)
            for key in hashes.intersection(line_of):
                if key not in shared:
                    done.add(line_of[key])
    if shared:
        colliding = {custom_id for custom_id in committed() if hash_of(custom_id) in shared}
        for line, custom_id in _ids_on_lines(input_path, sorted(line for lines in shared.values() for line in lines)):
            if custom_id in colliding:
                done.add(line)
    return done
