"""`vllm-batch` commands for what comes after a batch is submitted:

    vllm-batch tail ID                 print result lines as the server commits them, until the batch ends
    vllm-batch retry ID [ID ...]       a new batch of the requests that failed in these batches
    vllm-batch results ID              every request's result in input order (--with-retries: the best one)
    vllm-batch mark ID CUSTOM_ID ...   --label gold / --score 4 / --note "..." (--delete removes the mark)
    vllm-batch marks ID                list the marks
    vllm-batch export ID -o FILE       --format openai|sharegpt|alpaca|in-context|label-studio, --label gold ...
    vllm-batch import-marks ID FILE    marks from a Label Studio annotation export
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from vllm_batch._cli_numbers import interval, number, seconds, whole
from vllm_batch._export import FORMATS
from vllm_batch._followup import results_as_lines
from vllm_batch._labelstudio import label_studio_config
from vllm_batch._sync import VLLMBatch

COMMANDS = ("tail", "retry", "results", "mark", "marks", "export", "import-marks")


def add_commands(command: Callable[[str, str], argparse.ArgumentParser],
                 add_id: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add COMMANDS; `command(name, text)` makes one subcommand (described, with the backend options),
    `add_id` its batch id argument."""
    tail = command("tail", "print result lines as they are committed, until the end")
    add_id(tail)
    tail.add_argument("--no-errors", action="store_true", help="only successful results")
    tail.add_argument("--poll-interval", type=interval, default=5.0, help="longest wait between polls (s)")
    tail.add_argument("--timeout", type=seconds, help="give up after this many seconds (default: wait to the end)")

    retry = command("retry", "a new batch of the requests that failed")
    retry.add_argument("id", help="the batch to retry (with all its shards)")
    retry.add_argument("also", nargs="*", help="more batches whose failures to include, e.g. earlier retries")
    retry.add_argument("--completion-window", help="the new batch's completion window (default: the first batch's)")
    retry.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                       help="a metadata pair for the new batch; repeatable")
    retry.add_argument("--wait", action="store_true", help="wait for the new batch to end")
    retry.add_argument("--poll-interval", type=interval, default=60.0, help="longest wait between polls (s)")
    retry.add_argument("--timeout", type=seconds, help="give up waiting after this many seconds (exit status 2)")
    retry.add_argument("--no-progress", action="store_true", help="no progress bar")

    results = command("results", "every request's result in input order, as JSONL")
    add_id(results)
    results.add_argument("--with-retries", action="store_true", help="each request's best result over its retries")
    results.add_argument("-o", "--output", default="-", help="where the JSONL goes ('-' for stdout)")

    mark = command("mark", "mark results: a label, a score, a note")
    add_id(mark)
    mark.add_argument("custom_ids", nargs="+", metavar="CUSTOM_ID", help="the results to mark, by custom_id")
    mark.add_argument("--label", help='e.g. "gold" or "reject"')
    mark.add_argument("--score", type=number(), help="a number of your choosing, e.g. a rating from 1 to 5")
    mark.add_argument("--note", help="free text kept with the mark")
    mark.add_argument("--delete", action="store_true", help="remove the marks instead")

    marks = command("marks", "list a batch's marks")
    add_id(marks)
    marks.add_argument("--label", help="only this label")
    marks.add_argument("--json", action="store_true", help="one JSON object per line instead of tab-separated text")

    export = command("export", "results as fine-tuning, few-shot or Label Studio data")
    add_id(export)
    export.add_argument("-o", "--output", required=True, type=Path, help="the file to write")
    export.add_argument("--format", default="openai", choices=FORMATS, help="what the records look like")
    export.add_argument("--label", action="append", dest="labels", metavar="LABEL",
                        help="only results marked with this label (repeatable)")
    export.add_argument("--exclude-label", action="append", dest="exclude_labels", metavar="LABEL",
                        help="leave out results marked with this label (repeatable)")
    export.add_argument("--min-score", type=number(), help="only results marked with at least this score")
    export.add_argument("--errors", action="store_true", help="failed results too (label-studio only)")
    export.add_argument("--limit", type=whole(0), help="write at most this many records (default: all)")
    export.add_argument("--with-retries", action="store_true", help="each request's best result over its retries")

    imports = command("import-marks", "marks from a Label Studio annotation export")
    add_id(imports)
    imports.add_argument("file", type=Path, help="Label Studio's JSON or JSON-MIN export")


def _say(text: str) -> None:
    print(text, file=sys.stderr)


@contextmanager
def _sink(target: str) -> Iterator[IO[bytes]]:
    if target == "-":
        yield sys.stdout.buffer
        sys.stdout.flush()
        return
    with open(target, "wb") as fh:
        yield fh


def run_command(args: argparse.Namespace, client_kwargs: dict[str, Any]) -> int | None:
    """Run one of COMMANDS; None when the command is not one of them."""
    if args.command not in COMMANDS:
        return None
    with VLLMBatch.resume(args.id, **client_kwargs) as batch:
        if args.command == "tail":
            for line in batch.follow(errors=not args.no_errors, poll_interval=args.poll_interval,
                                     timeout=args.timeout):
                sys.stdout.buffer.write(next(results_as_lines([line])))
                sys.stdout.flush()
            return 0
        if args.command == "retry":
            metadata = dict(item.split("=", 1) for item in args.metadata if "=" in item)
            with batch.retry_failed(also=args.also, completion_window=args.completion_window,
                                    metadata=metadata or None) as again:
                print(again.id, flush=True)
                _say(f"retrying the failed requests of {', '.join([args.id, *args.also])} as {again.id}")
                if args.wait:
                    status = again.wait(poll_interval=args.poll_interval, timeout=args.timeout,
                                        progress=not args.no_progress, raise_on_failure=False)
                    c = status.request_counts
                    _say(f"{status.id}  {status.status}  {c.completed} completed, {c.failed} failed of {c.total}")
                    return 1 if status.status == "failed" else 0
            return 0
        if args.command == "results":
            found = batch.merged_results() if args.with_retries else batch.results()
            with _sink(args.output) as out:
                for raw in results_as_lines(found):
                    out.write(raw)
            return 0
        if args.command == "mark":
            if args.delete:
                for custom_id in args.custom_ids:
                    if not batch.unmark(custom_id):
                        _say(f"{custom_id}: had no mark")
                return 0
            if args.label is None and args.score is None and args.note is None:
                _say("vllm-batch: give --label, --score and/or --note (or --delete)")
                return 2
            for custom_id in args.custom_ids:
                batch.mark(custom_id, label=args.label, score=args.score, note=args.note)
            _say(f"marked {len(args.custom_ids)} result(s)")
            return 0
        if args.command == "marks":
            for mark in batch.marks(label=args.label):
                if args.json:
                    print(json.dumps({"batch_id": mark.batch_id, "custom_id": mark.custom_id, "label": mark.label,
                                      "score": mark.score, "note": mark.note, "updated_at": mark.updated_at}))
                else:
                    fields = [mark.custom_id, mark.label or "-", "-" if mark.score is None else f"{mark.score:g}",
                              mark.note or ""]
                    print("\t".join(fields))
            return 0
        if args.command == "export":
            count = batch.export(args.output, args.format, labels=args.labels, exclude_labels=args.exclude_labels,
                                 min_score=args.min_score, errors=args.errors, limit=args.limit,
                                 with_retries=args.with_retries)
            _say(f"wrote {count} {args.format} records to {args.output}")
            if args.format == "label-studio":
                config = args.output.with_name(args.output.stem + ".label-config.xml")
                config.write_text(label_studio_config())
                _say(f"labeling configuration for the project: {config}")
            return 0
        count = batch.import_label_studio(args.file)  # import-marks
        _say(f"set {count} marks from {args.file}")
        return 0
