"""Which input lines of several ended batches to retry, exactly, in memory that does not grow with the batches.

A request is retried when no batch given has a successful result for its custom_id, and once, from the first
batch (in the order given) and the first line that has it: a batch's retries share its custom_ids, so one id is
on a line of the original and again on a line of each retry that failed it.

The question is answered by sorting (custom_id, kind, batch, line) records, one per input line and per result
line, in runs of RUN records spilled to temporary files and merged: each custom_id's records then come together,
its successes first. Ids are compared as strings, never by hash, so there is nothing to confirm. What stays in
memory is one run while it is sorted, a line of each run while they merge, and a bit per input line for the
lines chosen (results.resubmit writes them out in a last pass over the inputs). Up to RUN records nothing is
spilled.
"""

from __future__ import annotations

import heapq
import itertools
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from vllm_batch_server.queue.custom_ids import LineSet, input_custom_id
from vllm_batch_server.store.jsonl import iter_custom_ids, iter_raw_lines

RUN = 200_000  # records sorted in memory at once (~30 MB of tuples)
FAN_IN = 64  # runs merged at once: a merge opens this many files
SUCCESS, REQUEST = 0, 1  # a result line sorts before the request lines of its id

Record = tuple[str, int, int, int]  # (custom_id, kind, batch index, line)


class TooMany(Exception):
    """More lines would be chosen than the limit."""


def failed_lines(inputs: list[Path], outputs: list[Path | None], limit: int,
                 scratch: Path | None = None) -> list[LineSet]:
    """For each batch (its input, and its committed output or None), the input lines to retry. Raises TooMany
    past `limit` lines."""
    chosen = [LineSet() for _ in inputs]
    count = 0
    for _, group in itertools.groupby(_sorted(_records(inputs, outputs), scratch), key=lambda record: record[0]):
        first = next(group)
        if first[1] == SUCCESS:
            continue  # some batch has its answer
        count += 1
        if count > limit:
            raise TooMany(limit)
        chosen[first[2]].add(first[3])
    return chosen


def _records(inputs: list[Path], outputs: list[Path | None]) -> Iterator[Record]:
    for index, output in enumerate(outputs):
        if output is not None:
            for custom_id in iter_custom_ids(output, output.stat().st_size):
                yield custom_id, SUCCESS, index, 0
    for index, path in enumerate(inputs):
        for line, raw in iter_raw_lines(path):
            yield input_custom_id(raw), REQUEST, index, line


def _sorted(records: Iterable[Record], scratch: Path | None) -> Iterator[Record]:
    """`records` in order, spilling sorted runs to files past RUN of them."""
    records = iter(records)
    first = sorted(itertools.islice(records, RUN))
    if len(first) < RUN:
        yield from first  # it all fit: nothing spilled
        return
    with tempfile.TemporaryDirectory(dir=scratch, prefix="retry-sort-") as folder:
        runs = [_spill(first, Path(folder))]
        while chunk := sorted(itertools.islice(records, RUN)):
            runs.append(_spill(chunk, Path(folder)))
        while len(runs) > FAN_IN:  # merge groups of runs into longer ones until one merge can take them all
            runs = [_spill(_merge(runs[i:i + FAN_IN]), Path(folder)) for i in range(0, len(runs), FAN_IN)]
        yield from _merge(runs)


def _spill(records: Iterable[Record], folder: Path) -> Path:
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record))  # ASCII: an id's lone surrogate survives the round trip
            out.write("\n")
        return Path(out.name)


def _merge(runs: list[Path]) -> Iterator[Record]:
    files: list[IO[str]] = []
    try:
        for run in runs:
            files.append(open(run, encoding="utf-8"))  # noqa: SIM115 - closed below
        yield from heapq.merge(*(map(_record, f) for f in files))
    finally:
        for f in files:
            f.close()
        for run in runs:
            run.unlink(missing_ok=True)


def _record(line: str) -> Record:
    custom_id, kind, index, number = json.loads(line)
    return custom_id, kind, index, number
