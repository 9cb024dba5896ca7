"""The request files `benchmarks.throughput` measures: what each workload is, generated from a seed.

Every measurement gets prompts of its own (a seed per workload and round): a server kept warm across rounds,
or a second run of the same file, would otherwise find the previous run's prompts in vLLM's prefix cache and
be measured on less work than the others.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._harness import write_jsonl

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"

_VOCABULARY = (
    "the of and to in is was for on that with as by at from his her they this have are which be one had "
    "not but what all were when there can an your more if out so said about their will up time other new "
    "some could these two may first then do any like my now over such our man me even most made after also "
    "did many before must through back years where much way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go came "
    "right used take three river battery kernel garden market signal planet engine letter bridge harvest "
    "window forest ticket village doctor silver winter summer ocean mountain station library museum theory"
)
WORDS = _VOCABULARY.split()
TOPICS = ["rivers", "batteries", "compilers", "gardens", "markets", "planets", "bridges", "forests", "museums",
          "trains", "libraries", "volcanoes", "bakeries", "satellites", "glaciers", "orchestras"]

PLAIN = ("short", "prefix", "mixed", "embed")
DOCUMENTS = ("documents", "documents-system")


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Workload:
    name: str
    endpoint: str
    model: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def write(self, path: Path) -> Path:
        write_jsonl(path, ({"custom_id": f"{self.name}-{i}", "method": "POST", "url": self.endpoint,
                            "body": body} for i, body in enumerate(self.bodies)))
        return path


def chat_body(model: str, messages: list[dict[str, str]], max_tokens: int, natural: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if not natural:
        body["ignore_eos"] = True
    return body


def plain(args: argparse.Namespace, name: str, seed: str) -> Workload:
    """short chats; one long system prompt with short questions; mixed lengths; embeddings."""
    rng = random.Random(f"{args.seed}-{seed}")
    n, model = args.requests, args.model
    if name == "short":
        return Workload(name, CHAT, model, [chat_body(model, [
            {"role": "user",
             "content": f"Write one sentence about {rng.choice(TOPICS)}: {text(rng, rng.randint(8, 24))}"}
        ], args.max_tokens, args.natural) for _ in range(n)],
            f"user turns of 10-30 words, {args.max_tokens} tokens out")
    if name == "prefix":
        system = f"You are a support agent. Follow these policies exactly. {text(rng, args.prefix_words)}"
        return Workload(name, CHAT, model, [chat_body(model, [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Question {i}: {text(rng, rng.randint(6, 14))}?"},
        ], 32, args.natural) for i in range(n)],
            f"one {args.prefix_words}-word system prompt, short user turns, 32 out")
    if name == "mixed":
        bodies = []
        for _ in range(n):
            words = rng.choice([10, 40, 120, 300])
            bodies.append(chat_body(model, [{"role": "user", "content": text(rng, words)}],
                                    rng.choice([8, 16, 32, 64, 96]), args.natural))
        return Workload(name, CHAT, model, bodies, "prompts of 10-300 words, 8-96 tokens out")
    if name == "embed":
        return Workload(name, EMBEDDINGS, args.embed_model, [
            {"model": args.embed_model, "input": text(rng, rng.randint(5, 120))} for _ in range(args.embed_requests)],
            "one input of 5-120 words per request")
    raise ValueError(name)


def documents(args: argparse.Namespace, name: str, seed: str) -> Workload:
    """Many long documents, each asked several questions, the file written question by question (every
    document's first question, then every second one: how such files are often built), so that the documents
    outgrow the KV cache before their next question. `documents-system` puts one long system prompt in front
    of every request, as most applications do."""
    rng = random.Random(f"{args.seed}-{seed}")
    model = args.model
    texts = [f"Document {d}. {text(rng, args.prefix_words)}" for d in range(args.documents)]
    system = None
    if name == "documents-system":
        system = f"You answer questions about one document at a time. {text(rng, args.prefix_words)}"
    bodies = []
    for q in range(args.questions):
        for d in range(args.documents):
            messages = [{"role": "user", "content": f"{texts[d]}\nQuestion {q}: {text(rng, 8)}?"}]
            if system is not None:
                messages.insert(0, {"role": "system", "content": system})
            bodies.append(chat_body(model, messages, 16, args.natural))
    shape = f"{args.documents} documents of {args.prefix_words} words × {args.questions} questions, interleaved"
    if system is not None:
        shape += f", behind one {args.prefix_words}-word system prompt"
    return Workload(name, CHAT, model, bodies, shape + ", 16 tokens out")


def workload(args: argparse.Namespace, name: str, seed: str) -> Workload:
    return documents(args, name, seed) if name in DOCUMENTS else plain(args, name, seed)


def queue(args: argparse.Namespace, seed: str) -> list[Workload]:
    """Three files over two models, as a user queues them for the night: chats, more chats, embeddings."""
    files = []
    for index, name in enumerate(("short", "mixed", "embed"), start=1):
        w = plain(args, name, f"{seed}-{name}")
        w.name = f"queue-{index}-{name}"
        files.append(w)
    return files


def warmup_body(body: dict[str, Any]) -> dict[str, Any]:
    """A request like `body` that shares no prompt prefix with it (a warm-up must not pre-fill the cache)."""
    body = json.loads(json.dumps(body))
    if "messages" in body:
        first = body["messages"][0]
        first["content"] = "Warm-up request, ignore. " + first["content"]
    else:
        body["input"] = "Warm-up request, ignore."
    return body
