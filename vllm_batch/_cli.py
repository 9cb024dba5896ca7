"""`vllm-batch`: submit, follow and fetch batches from the shell.

    vllm-batch create prompts.txt --model smollm2-135m-instruct -o requests.jsonl
    vllm-batch submit requests.jsonl --wait -o results.jsonl
    vllm-batch status batch_abc123
    vllm-batch mark batch_abc123 line-3 --label gold && vllm-batch export batch_abc123 -o train.jsonl --label gold

Batch ids go to stdout (for scripts); progress and human messages go to stderr. `-o -` writes results to
stdout. The backend comes from --provider/--base-url or the same environment variables as the library.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from vllm_batch import _cli_results
from vllm_batch._cli_numbers import interval, number, seconds, whole
from vllm_batch._errors import BatchFailedError, BatchTimeoutError, BatchValidationError, VLLMBatchError
from vllm_batch._providers import PRESETS
from vllm_batch._requests import CHAT, COMPLETIONS, EMBEDDINGS, dumps, normalize_endpoint, validate_body
from vllm_batch._status import BatchStatus
from vllm_batch._sync import VLLMBatch
from vllm_batch._version import __version__

# Stands in for the model while `create` checks a request written without one (for `submit --models`).
_NO_MODEL = "(set by submit --models)"


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text and not (
            isinstance(action.default, list) and not action.default
        ):
            text += " (default: %(default)s)"
        return text


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    # Added to each command rather than through `parents=`: argparse (before 3.12) moves a mutually exclusive
    # group that sits in an argument group out of it when copying a parent.
    where = parser.add_argument_group("backend (default: BATCH_PROVIDER / BATCH_BASE_URL, else the local server)")
    choice = where.add_mutually_exclusive_group()
    choice.add_argument("--provider", choices=sorted(PRESETS), help="a preset backend")
    choice.add_argument("--base-url", help="any OpenAI-compatible Batch API, e.g. http://gpu-box:4080/v1")
    where.add_argument("--api-key", help="key for that backend (default: the variable tied to its URL)")


def _add_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="the batch id that submit printed (any shard's id of a sharded batch)")


def _add_download_paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", help="where the results go ('-' for stdout; default ID-output.jsonl)")
    parser.add_argument("-e", "--errors", help="where the error lines go (default ID-errors.jsonl)")


def _add_wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--poll-interval", type=interval, default=60.0, help="longest wait between polls (s)")
    parser.add_argument("--timeout", type=seconds, help="give up waiting after this many seconds (exit status 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the server's batch objects as one JSON array (one object per server batch)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-batch", description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, client: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)
        if client:
            _add_client_options(cmd)
        return cmd

    submit = command("submit", "submit a JSONL file of requests")
    submit.add_argument("file", help="request lines (custom_id/method/url/body) or bare bodies; '-' for stdin")
    submit.add_argument("--wait", action="store_true", help="wait for the batch and download its results")
    submit.add_argument("--models", help="comma-separated: run every request on each of these models "
                                         "(the requests must not name a model: create them without --model)")
    submit.add_argument("--metadata", action="append", default=[], type=_pair, metavar="KEY=VALUE",
                        help="a metadata pair for the batch; repeatable")
    submit.add_argument("--max-requests", type=whole(1), help="shard past this many requests per batch")
    submit.add_argument("--max-bytes", type=whole(1), help="shard past this many bytes per batch file")
    _add_download_paths(submit)
    _add_wait_options(submit)

    status = command("status", "show a batch's status")
    _add_id(status)
    _add_json(status)

    cancel = command("cancel", "cancel a batch (exit status 1 if it had already ended)")
    _add_id(cancel)
    _add_json(cancel)

    wait = command("wait", "wait until a batch ends")
    _add_id(wait)
    _add_wait_options(wait)

    download = command("download", "download a finished batch's results")
    _add_id(download)
    _add_download_paths(download)

    listing = command("list", "recent batches, newest first")
    listing.add_argument("--limit", type=whole(1), default=20, help="how many batches to show")
    listing.add_argument("--json", action="store_true", help="print the server's batch objects as one JSON array")

    create = command("create", "turn a text file of prompts (one per line) into request JSONL", client=False)
    create.add_argument("prompts", help="text file, one prompt per line ('-' for stdin)")
    create.add_argument("--model", help="the model every request names; leave it out to submit with --models")
    create.add_argument("--endpoint", default="chat", choices=["chat", "completions", "embeddings"],
                        help="what the requests ask for")
    create.add_argument("--system", help="a system message for every chat request")
    create.add_argument("--max-tokens", type=whole(1),
                        help="the most tokens to generate per answer (chat, completions)")
    create.add_argument("--temperature", type=number(0),
                        help="sampling temperature, 0 to 2; 0 answers deterministically (chat, completions)")
    create.add_argument("-o", "--output", default="-", help="where the JSONL goes ('-' for stdout)")
    _cli_results.add_commands(command, _add_id)
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


def _wait(batch: VLLMBatch, args: argparse.Namespace, raise_on_failure: bool = False) -> BatchStatus:
    return batch.wait(poll_interval=args.poll_interval, timeout=args.timeout, progress=not args.no_progress,
                      raise_on_failure=raise_on_failure)


def _create(args: argparse.Namespace) -> None:
    endpoint = normalize_endpoint(args.endpoint)
    if endpoint == EMBEDDINGS and (args.max_tokens is not None or args.temperature is not None):
        raise VLLMBatchError("--max-tokens and --temperature do not apply to embeddings")
    if endpoint != CHAT and args.system is not None:
        raise VLLMBatchError("--system applies to chat requests only")
    _check_options(args, endpoint)
    source: IO[str] = sys.stdin if args.prompts == "-" else open(args.prompts, encoding="utf-8")  # noqa: SIM115
    sink: IO[bytes] = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")  # noqa: SIM115
    count = 0
    try:
        for number, raw in enumerate(source, 1):
            prompt = raw.rstrip("\n")
            if not prompt.strip():
                continue
            body: dict[str, Any] = {"model": args.model} if args.model else {}
            if endpoint == CHAT:
                messages = [{"role": "system", "content": args.system}] if args.system else []
                body["messages"] = [*messages, {"role": "user", "content": prompt}]
            elif endpoint == COMPLETIONS:
                body["prompt"] = prompt
            elif endpoint == EMBEDDINGS:
                body["input"] = prompt
            if args.max_tokens is not None:
                body["max_tokens"] = args.max_tokens
            if args.temperature is not None:
                body["temperature"] = args.temperature
            sink.write(dumps({"custom_id": f"line-{number}", "method": "POST", "url": endpoint, "body": body}))
            count += 1
    finally:
        if source is not sys.stdin:
            source.close()
        if sink is not sys.stdout.buffer:
            sink.close()
        else:
            sink.flush()
    _say(f"{count} requests" + ("" if args.model else " without a model: submit them with --models"))


def _check_options(args: argparse.Namespace, endpoint: str) -> None:
    """Check the options once, on a sample request, and name the option (not a line) when one is wrong."""
    body: dict[str, Any] = {"model": args.model or _NO_MODEL,
                            {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "input"}[endpoint]:
                            [{"role": "user", "content": "x"}] if endpoint == CHAT else "x"}
    options = {"max_tokens": ("--max-tokens", args.max_tokens), "temperature": ("--temperature", args.temperature),
               "model": ("--model", args.model)}
    for name, (_, value) in options.items():
        if value is not None:
            body[name] = value
    try:
        validate_body(endpoint, body)
    except BatchValidationError as exc:
        option = options.get(exc.field or "", (exc.field, None))[0]
        raise VLLMBatchError(f"{option}: {exc.reason}") from None


def _print_json(status_or_batches: Any) -> None:
    batches = status_or_batches.batches if isinstance(status_or_batches, BatchStatus) else status_or_batches
    print(json.dumps([b.model_dump(mode="json") for b in batches], indent=2))


def _submit(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    with VLLMBatch(**_client(args, models=models, max_requests=args.max_requests, max_bytes=args.max_bytes)) as batch:
        batch.add_jsonl(sys.stdin.buffer if args.file == "-" else args.file)
        batch_id = batch.submit(metadata=dict(args.metadata) or None)
        if not (args.wait and args.output == "-"):
            print(batch_id, flush=True)
        _say(
            f"submitted {len(batch)} requests as {batch_id}"
            + (f" ({len(batch.batch_ids)} batches)" if len(batch.batch_ids) > 1 else "")
        )
        if not args.wait:
            return 0
        try:
            status = _wait(batch, args, raise_on_failure=True)
        except BatchFailedError as exc:
            _say(_describe(exc.status))
            raise
        _say(_describe(status))
        _download(batch, args.output, args.errors)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "create":
        _create(args)
        return 0
    if args.command == "submit":
        return _submit(args)
    if args.command == "list":
        with VLLMBatch(**_client(args)) as client:
            batches = client.list_batches(limit=args.limit)
        if args.json:
            _print_json(batches)
            return 0
        for b in batches:
            c = b.request_counts
            counts = f"{c.completed}/{c.total} failed {c.failed}" if c else ""
            print(f"{b.id}\t{b.status}\t{b.endpoint}\t{counts}")
        return 0
    if (code := _cli_results.run_command(args, _client(args))) is not None:
        return code

    with VLLMBatch.resume(args.id, **_client(args)) as batch:
        cancelled_now = False
        if args.command == "download":
            _download(batch, args.output, args.errors)
            return 0
        if args.command == "status":
            status = batch.status()
        elif args.command == "cancel":
            # resume() has just read every shard: one that had already ended (cancelled included) is left as
            # it is, and if all had, nothing was cancelled.
            ended_before = batch._core.snapshot().done
            status = batch.cancel()
            cancelled_now = not ended_before and status.status in ("cancelling", "cancelled")
        else:  # wait
            status = _wait(batch, args)
        if getattr(args, "json", False):
            _print_json(status)
        else:
            print(_describe(status))
            for error in status.errors[:20]:
                _say(f"  line {error.get('line')}: {error.get('message')}")
        if args.command == "cancel" and not cancelled_now:
            _say(f"vllm-batch: batch {status.id} had already ended ({status.status}); nothing was cancelled")
            return 1
        return 1 if status.status == "failed" else 0


class _StderrLog(logging.Handler):
    """The client's retry messages, so a slow or unreachable server is never a silent wait."""

    def emit(self, record: logging.LogRecord) -> None:
        _say(f"vllm-batch: {record.getMessage()}")


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a closed pipe is discarded instead of raising
    BrokenPipeError again (and printing it) at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (captured): nothing will flush it to a pipe
        pass


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("vllm_batch")
    handler = _StderrLog(logging.WARNING)
    logger.addHandler(handler)
    try:
        code = run(args)
    except BrokenPipeError:
        # Whoever read stdout stopped (`| head`): stop quietly, with the status a shell tool killed by SIGPIPE
        # has (128 + 13), and keep Python from failing again when it flushes stdout on the way out.
        _drop_stdout()
        code = 141
    except BatchTimeoutError as exc:
        _say(f"vllm-batch: {exc}")
        code = 2
    except (VLLMBatchError, OSError) as exc:
        _say(f"vllm-batch: {exc}")
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        logger.removeHandler(handler)
    sys.exit(code)


if __name__ == "__main__":
    main()
