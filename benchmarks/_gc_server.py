"""`python -m benchmarks._gc_server serve ...`: the server, timing its garbage collections (issue 29).

Each SIGUSR2 appends a JSON line to the file named by `BENCH_GC_STATS`: per generation, how many collections so
far and the seconds spent in them. `benchmarks.big_batch --gc-stats` reads them at the start and the end of a
run. The callback costs two clock reads per collection.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import time
from typing import Any

from vllm_batch_server.cli import main

_totals = {generation: [0, 0.0] for generation in range(3)}
_started = [0.0]


def _collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        total = _totals[info["generation"]]
        total[0] += 1
        total[1] += time.perf_counter() - _started[0]


def _dump(*_: object) -> None:
    with open(os.environ["BENCH_GC_STATS"], "a") as fh:
        fh.write(json.dumps({"time": time.time(), "collections": _totals}) + "\n")


if __name__ == "__main__":
    gc.callbacks.append(_collection)
    signal.signal(signal.SIGUSR2, _dump)
    main()
