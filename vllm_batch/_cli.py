"""`vllm-batch`: submit, follow and fetch batches from the shell.

    vllm-batch create prompts.txt --model smollm2-135m-instruct -o requests.jsonl
    vllm-batch submit requests.jsonl --wait -o results.jsonl
    vllm-batch status batch_abc123

Batch ids go to stdout (for scripts); progress and human messages go to stderr. `-o -` writes results to
stdout. The backend comes from --provider/--base-url or the same environment variables as the library.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from vllm_batch._errors import BatchFailedError, BatchTimeoutError, VLLMBatchError
from vllm_batch._providers import PRESETS
from vllm_batch._requests import CHAT, COMPLETIONS, EMBEDDINGS, dumps, normalize_endpoint, validate_body
from vllm_batch._status import BatchStatus
from vllm_batch._sync import VLLMBatch


def _client_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    where = parent.add_argument_group("backend (default: BATCH_PROVIDER / BATCH_BASE_URL, else the local server)")
    choice = where.add_mutually_exclusive_group()
    choice.add_argument("--provider", choices=sorted(PRESETS), help="a preset backend")
    choice.add_argument("--base-url", help="any OpenAI-compatible Batch API, e.g. http://gpu-box:4080/v1")
    where.add_argument("--api-key", help="key for that backend (default: the variable tied to its URL)")
    return parent


def _add_download_paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", help="where the results go ('-' for stdout; default ID-output.jsonl)")
    parser.add_argument("-e", "--errors", help="where the error lines go (default ID-errors.jsonl)")


def _add_wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--poll-interval", type=float, default=60.0, help="longest wait between polls (s)")
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    common = _client_options()
    parser = argparse.ArgumentParser(prog="vllm-batch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", parents=[common], help="submit a JSONL file of requests")
    submit.add_argument("file", type=Path, help="request lines (custom_id/method/url/body) or bare bodies")
    submit.add_argument("--wait", action="store_true", help="wait for the batch and download its results")
    submit.add_argument("--models", help="comma-separated: run every request on each of these models")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    submit.add_argument("--max-requests", type=int, help="shard past this many requests per batch")
    submit.add_argument("--max-bytes", type=int, help="shard past this many bytes per batch file")
    _add_download_paths(submit)
    _add_wait_options(submit)

    for name, text in (("status", "show a batch's status"), ("cancel", "cancel a batch")):
        cmd = sub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("id")
        cmd.add_argument("--json", action="store_true", help="print the server's batch objects as JSON")

    wait = sub.add_parser("wait", parents=[common], help="wait until a batch ends")
    wait.add_argument("id")
    _add_wait_options(wait)

    download = sub.add_parser("download", parents=[common], help="download a finished batch's results")
    download.add_argument("id")
    _add_download_paths(download)

    listing = sub.add_parser("list", parents=[common], help="recent batches, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")

    create = sub.add_parser("create", help="turn a text file of prompts (one per line) into request JSONL")
    create.add_argument("prompts", type=Path, help="text file, one prompt per line ('-' for stdin)")
    create.add_argument("--model", required=True)
    create.add_argument("--endpoint", default="chat", choices=["chat", "completions", "embeddings"])
    create.add_argument("--system", help="a system message for every chat request")
    create.add_argument("--max-tokens", type=int)
    create.add_argument("--temperature", type=float)
    create.add_argument("-o", "--output", default="-", help="where the JSONL goes (default stdout)")
    return parser


def _client(args: argparse.Namespace, **kwargs: Any) -> dict[str, Any]:
    return {"provider": args.provider, "base_url": args.base_url, "api_key": args.api_key, **kwargs}


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _describe(status: BatchStatus) -> str:
    c = status.request_counts
    shards = f" ({len(status.batches)} batches)" if len(status.batches) > 1 else ""
    return f"{status.id}  {status.status}  {c.completed} completed, {c.failed} failed of {c.total}{shards}"


def _download(batch: VLLMBatch, output: str | None, errors: str | None) -> None:
    if output == "-":
        with tempfile.TemporaryDirectory() as tmp:
            out, err = batch.download(Path(tmp) / "output.jsonl", errors)
            if out is not None:
                with open(out, "rb") as fh:
                    shutil.copyfileobj(fh, sys.stdout.buffer)
                sys.stdout.flush()
        if err is not None:
            _say(f"errors: {err}")
        return
    out, err = batch.download(output, errors)
    _say(f"output: {out}" if out else "no output file")
    if err is not None:
        _say(f"errors: {err}")


def _wait(batch: VLLMBatch, args: argparse.Namespace) -> BatchStatus:
    return batch.wait(
        poll_interval=args.poll_interval, timeout=args.timeout, progress=not args.no_progress, raise_on_failure=False
    )


def _create(args: argparse.Namespace) -> None:
    endpoint = normalize_endpoint(args.endpoint)
    source: IO[str] = sys.stdin if str(args.prompts) == "-" else open(args.prompts, encoding="utf-8")  # noqa: SIM115
    sink: IO[bytes] = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")  # noqa: SIM115
    count = 0
    try:
        for number, raw in enumerate(source, 1):
            prompt = raw.rstrip("\n")
            if not prompt.strip():
                continue
            body: dict[str, Any] = {"model": args.model}
            if endpoint == CHAT:
                messages = [{"role": "system", "content": args.system}] if args.system else []
                body["messages"] = [*messages, {"role": "user", "content": prompt}]
            elif endpoint == COMPLETIONS:
                body["prompt"] = prompt
            elif endpoint == EMBEDDINGS:
                body["input"] = prompt
            if endpoint != EMBEDDINGS:
                if args.max_tokens is not None:
                    body["max_tokens"] = args.max_tokens
                if args.temperature is not None:
                    body["temperature"] = args.temperature
            validate_body(endpoint, body, number)
            sink.write(dumps({"custom_id": f"line-{number}", "method": "POST", "url": endpoint, "body": body}))
            count += 1
    finally:
        if source is not sys.stdin:
            source.close()
        if sink is not sys.stdout.buffer:
            sink.close()
        else:
            sink.flush()
    _say(f"{count} requests")


def run(args: argparse.Namespace) -> int:
    if args.command == "create":
        _create(args)
        return 0
    if args.command == "submit":
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        metadata = dict(item.split("=", 1) for item in args.metadata if "=" in item)
        with VLLMBatch.from_jsonl(
            args.file, **_client(args, models=models, max_requests=args.max_requests, max_bytes=args.max_bytes)
        ) as batch:
            batch_id = batch.submit(metadata=metadata or None)
            if not (args.wait and args.output == "-"):
                print(batch_id, flush=True)
            _say(
                f"submitted {len(batch)} requests as {batch_id}"
                + (f" ({len(batch.batch_ids)} batches)" if len(batch.batch_ids) > 1 else "")
            )
            if not args.wait:
                return 0
            status = _wait(batch, args)
            _say(_describe(status))
            if status.status == "failed":
                raise BatchFailedError(status.id, status.errors, status)
            _download(batch, args.output, args.errors)
        return 0
    if args.command == "list":
        with VLLMBatch(**_client(args)) as client:
            batches = client.list_batches(limit=args.limit)
        for b in batches:
            if args.json:
                print(b.to_json(indent=None))
            else:
                c = b.request_counts
                counts = f"{c.completed}/{c.total} failed {c.failed}" if c else ""
                print(f"{b.id}\t{b.status}\t{b.endpoint}\t{counts}")
        return 0

    with VLLMBatch.resume(args.id, **_client(args)) as batch:
        if args.command == "status":
            status = batch.status()
        elif args.command == "cancel":
            status = batch.cancel()
        elif args.command == "wait":
            status = _wait(batch, args)
        else:  # download
            _download(batch, args.output, args.errors)
            return 0
        if getattr(args, "json", False):
            for b in status.batches:
                print(b.to_json(indent=None))
        else:
            print(_describe(status))
            for error in status.errors[:20]:
                _say(f"  line {error.get('line')}: {error.get('message')}")
        return 1 if status.status == "failed" else 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = run(args)
    except BatchTimeoutError as exc:
        _say(f"vllm-batch: {exc}")
        code = 2
    except (VLLMBatchError, OSError) as exc:
        _say(f"vllm-batch: {exc}")
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
