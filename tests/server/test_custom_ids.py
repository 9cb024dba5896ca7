"""custom_ids.py: duplicates and the lines already done, found through hashes on disk, exactly as a set of the ids
would find them, whatever the hash collides on; and in memory that does not grow with the number of lines."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_batch_server.queue import custom_ids
from vllm_batch_server.queue.custom_ids import DuplicateFinder, HashSpill, LineSet, input_custom_id, lines_done


def write_lines(path: Path, ids: list[str], *, compact: bool = True) -> None:
    separators = (",", ":") if compact else None
    path.write_text("".join(json.dumps({"custom_id": i, "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"model": "m"}}, separators=separators) + "\n" for i in ids))


def reference_duplicates(ids: list[str], limit: int) -> list[tuple[int, int, str]]:
    """What the set of every id found: (line, first line, id) of each repeat, in line order."""
    first: dict[str, int] = {}
    found = []
    for line, custom_id in enumerate(ids, start=1):
        if custom_id in first:
            found.append((line, first[custom_id], custom_id))
        else:
            first[custom_id] = line
    return found[:limit]


def find(path: Path, ids: list[str], limit: int, hash_id: Callable[[str], int],
         size: int) -> list[tuple[int, int, str]]:
    with DuplicateFinder(size, path.parent, hash_id=hash_id) as finder:
        for line, custom_id in enumerate(ids, start=1):
            finder.add(custom_id, line)
        return [(d.line, d.first, d.custom_id) for d in finder.duplicates(path, limit)]


# Hashes from always colliding to practically never: the modulus is how many values the hash can take.
HASHES = st.sampled_from([1, 2, 3, 7, 1000, 2**63]).map(lambda m: (lambda s: hash(s) % m))
IDS = st.lists(st.integers(0, 60).map(lambda n: f"id-{n}"), min_size=1, max_size=150)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffers of 3 pairs, so a few dozen lines already go to the file in chains of chunks."""
    monkeypatch.setattr(custom_ids, "_BUFFER_VALUES", 8)


@pytest.mark.usefixtures("small_chunks")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=IDS, hash_id=HASHES, limit=st.sampled_from([1, 2, 5, 101]),
       size=st.sampled_from([1, 40 << 20, 1 << 30]))
def test_duplicates_are_those_a_set_of_the_ids_finds_whatever_the_hash_collides_on(
        tmp_path: Path, ids: list[str], hash_id: Callable[[str], int], limit: int, size: int) -> None:
    path = tmp_path / "input.jsonl"
    write_lines(path, ids)
    assert find(path, ids, limit, hash_id, size) == reference_duplicates(ids, limit)


@pytest.mark.usefixtures("small_chunks")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=IDS, hash_id=HASHES, data=st.data(), compact=st.booleans())
def test_lines_done_are_exactly_those_of_committed_ids_whatever_the_hash_collides_on(
        tmp_path: Path, ids: list[str], hash_id: Callable[[str], int], data: st.DataObject, compact: bool) -> None:
    unique = list(dict.fromkeys(ids))  # validation refused the rest
    committed = data.draw(st.lists(st.sampled_from(unique), unique=True))
    path = tmp_path / "input.jsonl"
    write_lines(path, unique, compact=compact)
    done = lines_done(path, lambda: iter(committed), tmp_path, hash_id=hash_id)
    expected = {line for line, custom_id in enumerate(unique, start=1) if custom_id in set(committed)}
    assert set(done) == expected
    assert len(done) == len(expected)


def test_distinct_ids_with_one_hash_are_no_duplicates_and_a_real_one_among_them_is_found(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "b", "d", "a"]
    path = tmp_path / "input.jsonl"
    write_lines(path, ids)
    assert find(path, ids, 100, lambda s: 42, 1) == [(4, 2, "b"), (6, 1, "a")]
    assert find(path, ids[:3], 100, lambda s: 42, 1) == []


def test_a_resume_with_every_hash_equal_still_skips_exactly_the_committed_lines(tmp_path: Path) -> None:
    ids = [f"req-{i}" for i in range(50)]
    path = tmp_path / "input.jsonl"
    write_lines(path, ids)
    committed = ids[::3]
    done = lines_done(path, lambda: iter(committed), tmp_path, hash_id=lambda s: -7)
    assert sorted(done) == [i + 1 for i in range(0, 50, 3)]


def test_nothing_committed_reads_no_input(tmp_path: Path) -> None:
    assert len(lines_done(tmp_path / "not-there.jsonl", lambda: iter([]), tmp_path)) == 0


@pytest.mark.parametrize("raw", [
    b'{"custom_id":"plain","method":"POST"}',
    b'{"custom_id": "spaced", "method": "POST"}',
    b'{"method":"POST","custom_id":"not first"}',
    b'{"custom_id":"first","custom_id":"last wins"}',
    b'{"custom_id":"a","custom\\u005fid":"escaped key wins"}',
    b'{"custom_id":"quote\\"inside"}',
    b'{"custom_id":"\\u00fcnicode escaped"}',
    '{"custom_id":"ünïcödé"}'.encode(),
    b'{"custom_id":"x","body":{"custom_id":"nested"}}',
])
def test_reading_an_input_lines_custom_id_agrees_with_parsing_it(raw: bytes) -> None:
    assert input_custom_id(raw) == json.loads(raw)["custom_id"]


def test_spill_gives_back_every_pair_by_partition_from_memory_and_disk(tmp_path: Path,
                                                                       small_chunks: None) -> None:
    pairs = [(key, key * 10) for key in range(-500, 500)]
    with HashSpill(tmp_path, 8) as spill:
        for key, value in pairs:
            spill.add(key, value)
        for index in range(8):
            values = spill.partition(index)
            got = sorted(zip(values[0::2], values[1::2], strict=True))
            assert got == sorted(p for p in pairs if p[0] & 7 == index)


def test_a_small_input_never_touches_the_disk(tmp_path: Path) -> None:
    with HashSpill(tmp_path, custom_ids.partitions_for(10 << 20)) as spill:
        for key in range(400):
            spill.add(hash(f"id-{key}"), key)
        assert spill._file is None


def test_line_set() -> None:
    lines = LineSet()
    for line in (1, 8, 9, 100_000, 3):
        lines.add(line)
    lines.add(8)
    assert (len(lines), sorted(lines)) == (5, [1, 3, 8, 9, 100_000])
    assert 8 in lines and 2 not in lines and 10**9 not in lines and -1 not in lines


def test_memory_does_not_grow_with_the_number_of_ids(tmp_path: Path) -> None:
    """100,000 ids: a set of them takes 6.3 MB for its table alone (the ids' strings besides); the finder keeps
    its buffers and one partition at a time (0.5 MB here, 0.4 MB for 20,000 ids)."""
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"")
    ids = [f"request-{i}" for i in range(100_000)]
    tracemalloc.start()
    try:
        with DuplicateFinder(1 << 30, tmp_path) as finder:  # an input of 1 GiB: 64 partitions
            for line, custom_id in enumerate(ids, start=1):
                finder.add(custom_id, line)
            assert finder.duplicates(path, 101) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
