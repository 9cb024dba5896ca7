"""Side-by-side measurements of vllm-batch: `python -m benchmarks [NAME ...]` (or `nox -s benchmarks`).

Each benchmark is also a module of its own (`python -m benchmarks.NAME --help`); each prints a table and
writes JSON under `benchmarks/results/`. See docs/performance.md for the latest numbers.
"""
