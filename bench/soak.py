"""Soak: minutes of mixed traffic from many concurrent clients against a real server (by hand; never in CI).

Starts its own `prefix-serve` (a tiny GPT-2 with wide greedy margins, its embedded Redis under a
temporary data dir: never the shared Redis on 6379), uploads 16 tasks of different prefix lengths
and kinds (canonical tensor, PEFT checkpoint, text), then runs `--clients` asyncio clients on
loopback for `--duration` seconds. Each client loops over a weighted mix: greedy and seeded
sampling on `/generate` (plain and streamed) and `/v1/completions` (plain and streamed),
cancellations (a stream closed after a few tokens, a request abandoned after a short timeout),
bad requests (each must get its exact 4xx status and error code), admin uploads of new versions
of the three "churn" tasks, and admin reads.

Answers are verified, not only counted: every answer to the same (task, prefix version, prompt,
sampling) must be identical token for token whichever endpoint served it, streamed or not; every
200 must have the contract's shape (token count = usage, finish reason consistent with the
tokens and `max_new_tokens`, the prefix length of the version it names); no 5xx ever.
A request is *lost* when it got neither a full answer nor was deliberately cancelled by its client.
The server's RSS is sampled every few seconds: growth after the warm-up must stay under 5%, and
the running/waiting/loading gauges must be back to 0 once the traffic stops.

Also reported, as warnings rather than failures: 5xx that only the server's own
`prefix_server_requests_total` recorded, and ERROR lines in its log.

Writes `bench/results/soak.json` and the soak section of `docs/benchmarks.md`; exits 1 if anything failed.
`--duration 60` is a quick check; `--mix generate=1,bad_request=1` narrows the traffic (to bisect).
Generation requests carry the headers of `client_headers()`: the one place to add an API key.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import random
import secrets
import string
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import safetensors.torch
import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.doc_sections import write_section  # noqa: E402
from tests.server_process import ServerProcess, metric_value  # noqa: E402
from tests.tiny_models import save_adapter, save_tiny_model  # noqa: E402

MAX_POSITIONS = 512  # the model's context (and the server's --max-model-len)
MAX_NEW_LIMIT = 64  # the server's --max-new-tokens
MAX_UPLOAD_BYTES = 1 << 20  # the server's --max-upload-bytes
REQUEST_TIMEOUT_S = 60.0
PREFIX_LENS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96)
TENANTS = ("acme", "globex", "initech", "umbrella")
CHURN, PEFT, TEXT = (3, 9, 14), (5, 11), (2, 7, 12)  # task indexes by role / initial kind
MAX_NEW_CHOICES = (4, 8, 16, 32)
NUM_PROMPTS = 24
GAUGES = (
    "prefix_server_running_requests",
    "prefix_server_waiting_requests",
    "prefix_server_loading_requests",
)
MIX = {  # relative weights of what a client does next
    "generate": 34,
    "generate_stream": 14,
    "generate_sampled": 6,
    "completions": 8,
    "completions_stream": 6,
    "cancel_stream": 6,
    "cancel_timeout": 4,
    "bad_request": 16,
    "admin_upload": 2,
    "admin_read": 2,
}
OK, CANCELLED, LOST, WRONG = "ok", "cancelled", "lost", "wrong"
RSS_LIMIT_PCT = 5.0


class Mismatch(Exception):
    """The server answered, but not what the contract says."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.status = status


class Lost(Exception):
    """No full answer arrived (a truncated stream) although the client did not give up."""


# ---- workload ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    duration: float
    clients: int
    warmup: float
    out: Path
    docs: Path | None
    seed: int
    rss_interval: float
    mix: dict[str, int]
    use_keys: bool  # one API key per tenant (scoped `tenant:*`), as a multi-tenant deployment runs


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    prefix_len: int  # of the first version
    kind: str  # tensor | peft | text
    is_churn: bool


@dataclass(frozen=True)
class PromptSpec:
    text: str
    ids: tuple[int, ...]
    max_new: int


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def body(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


GREEDY = Sampling()


def sampled(rng: random.Random) -> Sampling:
    return Sampling(temperature=0.8, top_k=rng.choice((0, 20)), top_p=0.95, seed=rng.randrange(4))


def task_specs() -> list[TaskSpec]:
    def kind(i: int) -> str:
        return "peft" if i in PEFT else "text" if i in TEXT else "tensor"

    return [
        TaskSpec(f"{TENANTS[i % len(TENANTS)]}:t{i:02d}", length, kind(i), i in CHURN)
        for i, length in enumerate(PREFIX_LENS)
    ]


def prompt_specs(tokenizer: Any, rng: random.Random) -> list[PromptSpec]:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8))) for _ in range(64)]
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(NUM_PROMPTS - 2)]
    texts += ["héllo wörld ✓", "?"]  # multi-byte characters and a one-token prompt
    return [
        PromptSpec(t, tuple(tokenizer.encode(t, add_special_tokens=False)), MAX_NEW_CHOICES[i % 4])
        for i, t in enumerate(texts)
    ]


def random_text(rng: random.Random, length: int) -> str:
    """Letters and spaces, never only spaces (a blank text prefix is refused)."""
    return rng.choice(string.ascii_letters) + "".join(rng.choices(string.ascii_letters + " ", k=length - 1))


# ---- verification state -----------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    text: str
    finish: str  # OpenAI's form: length | stop
    num_tokens: int
    token_ids: tuple[int, ...] | None  # /v1/completions does not return them


class References:
    """The first answer per (task, version, prompt, sampling); every later one must equal it."""

    def __init__(self) -> None:
        self._answers: dict[tuple[Any, ...], Answer] = {}

    def check(self, key: tuple[Any, ...], answer: Answer) -> None:
        first = self._answers.setdefault(key, answer)
        same = (first.text, first.finish, first.num_tokens) == (answer.text, answer.finish, answer.num_tokens)
        if first.token_ids is not None and answer.token_ids is not None:
            same = same and first.token_ids == answer.token_ids
        if not same:
            raise Mismatch(f"answer for {key} differs from the first one: {first} vs {answer}")
        if first.token_ids is None and answer.token_ids is not None:
            self._answers[key] = answer

    def __len__(self) -> int:
        return len(self._answers)


class Versions:
    """Uploaded versions and their prefix lengths; the versions generations claimed, checked at the end."""

    def __init__(self) -> None:
        self.uploaded: dict[str, dict[int, int]] = defaultdict(dict)
        self.observed: list[tuple[str, str, int, int]] = []  # (op kind, task, version, prefix_tokens)

    def upload(self, task_id: str, version: int, prefix_len: int) -> None:
        if version in self.uploaded[task_id]:
            raise Mismatch(f"{task_id}: version {version} was returned by two uploads", 201)
        self.uploaded[task_id][version] = prefix_len

    def problems(self) -> list[tuple[str, str]]:
        """(op kind, what is wrong) for each generation whose version/prefix length was never uploaded."""
        found = []
        for kind, task_id, version, prefix_tokens in self.observed:
            expected = self.uploaded[task_id].get(version)
            if expected != prefix_tokens:
                found.append(
                    (kind, f"{task_id} v{version}: prefix_tokens {prefix_tokens}, uploaded {expected}")
                )
        return found


@dataclass
class KindStats:
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)


class Tally:
    """Per op kind: outcomes, HTTP statuses, latencies of the good ones, and the first problems."""

    def __init__(self) -> None:
        self.kinds: dict[str, KindStats] = defaultdict(KindStats)
        self.problems: list[str] = []

    def record(self, kind: str, outcome: str, status: int | None, seconds: float, detail: str) -> None:
        stats = self.kinds[kind]
        stats.requests += 1
        stats.outcomes[outcome] += 1
        stats.statuses["none" if status is None else str(status)] += 1
        if outcome == OK:
            stats.latencies_s.append(seconds)
        if detail and len(self.problems) < 50:
            self.problems.append(f"{kind}: {outcome}: {detail}"[:600])

    def reclassify(self, kind: str, detail: str) -> None:
        """A request counted OK turned out wrong in a check at the end."""
        self.kinds[kind].outcomes[OK] -= 1
        self.kinds[kind].outcomes[WRONG] += 1
        if len(self.problems) < 50:
            self.problems.append(f"{kind}: {WRONG} (final check): {detail}")


@dataclass
class Ctx:
    """What every client shares."""

    http: httpx.AsyncClient
    headers: dict[str, str]  # generation requests: the one place to add credentials (an API key)
    admin: dict[str, str]
    tasks: list[TaskSpec]
    prompts: list[PromptSpec]
    eos_ids: frozenset[int]
    layout: tuple[int, int, int]  # (num_layers, num_kv_heads, head_dim) of a canonical prefix
    bad_cases: list[BadCase]
    decode: Callable[[tuple[int, ...]], str]  # the contract's `text`: skip_special_tokens=True
    refs: References = field(default_factory=References)
    versions: Versions = field(default_factory=Versions)
    bad_counts: Counter[str] = field(default_factory=Counter)  # requests per bad case
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> API key secret (empty: dev mode)

    def headers_for(self, task_id: str) -> dict[str, str]:
        """Generation headers for a task: with keys, its tenant's key."""
        secret = self.keys.get(task_id.split(":", 1)[0])
        return self.headers if secret is None else {**self.headers, "Authorization": f"Bearer {secret}"}

    @property
    def stable(self) -> list[TaskSpec]:
        return [t for t in self.tasks if not t.is_churn]

    def first_version(self, task: TaskSpec) -> int:
        """The only version a stable task ever has."""
        return next(iter(self.versions.uploaded[task.task_id]))


def client_headers() -> dict[str, str]:
    """Headers of every generation request (`/generate`, `/v1/*`); add an API key here when needed."""
    return {"user-agent": "prefix-soak/1"}


# ---- checks -----------------------------------------------------------------------------------
def json_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise Mismatch(f"not JSON: {response.text[:200]!r}", response.status_code) from exc


def expect_status(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise Mismatch(
            f"status {response.status_code}, wanted {status}: {response.text[:300]}", response.status_code
        )


def get(obj: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Mismatch(f"field {key!r} is {value!r}, wanted {kind}")
    return value


def check_finish(
    finish: str, ids: list[int], max_new: int, eos_ids: frozenset[int], ignore_eos: bool
) -> None:
    """The finish reason agrees with the tokens: `length` = max_new tokens, `eos` = ends in EOS."""
    n = len(ids)
    ok = 1 <= n <= max_new and finish in ("length", "eos")  # we never send stop strings
    if finish == "length":
        ok = ok and n == max_new
    if finish == "eos":
        ok = ok and ids[-1] in eos_ids and not ignore_eos
    if not ignore_eos:
        ok = ok and not eos_ids.intersection(ids[:-1])  # EOS ends a row at once
    if not ok:
        raise Mismatch(f"finish_reason {finish!r} with {n} tokens (max_new_tokens {max_new}): {ids}")


def check_generation(
    ctx: Ctx, kind: str, task: TaskSpec, prompt: PromptSpec, body: Any, max_new: int, ignore_eos: bool = False
) -> tuple[int, Answer]:
    """The shape of a `/generate` answer; returns its prefix version and the comparable answer."""
    if get(body, "task_id", str) != task.task_id:
        raise Mismatch(f"task_id {body['task_id']!r}, wanted {task.task_id!r}")
    version = get(body, "prefix_version", int)
    text, ids = get(body, "text", str), get(body, "token_ids", list)
    usage = get(body, "usage", dict)
    if not all(isinstance(t, int) for t in ids) or get(usage, "completion_tokens", int) != len(ids):
        raise Mismatch(f"usage {usage} does not count token_ids {ids}")
    if get(usage, "prompt_tokens", int) != len(prompt.ids):
        raise Mismatch(f"prompt_tokens {usage['prompt_tokens']}, wanted {len(prompt.ids)}")
    if text != ctx.decode(tuple(ids)):
        raise Mismatch(f"text {text!r} is not the decoding of token_ids {ids}: {ctx.decode(tuple(ids))!r}")
    prefix_tokens = get(usage, "prefix_tokens", int)
    if not task.is_churn and prefix_tokens != task.prefix_len:
        raise Mismatch(f"{task.task_id}: prefix_tokens {prefix_tokens}, wanted {task.prefix_len}")
    ctx.versions.observed.append((kind, task.task_id, version, prefix_tokens))
    finish = get(body, "finish_reason", str)
    check_finish(finish, ids, max_new, ctx.eos_ids, ignore_eos)
    return version, Answer(text, "length" if finish == "length" else "stop", len(ids), tuple(ids))


def check_stable_version(ctx: Ctx, task: TaskSpec, version: int) -> None:
    expected = ctx.first_version(task)
    if not task.is_churn and version != expected:
        raise Mismatch(
            f"{task.task_id} is never re-uploaded but answered version {version}, wanted {expected}"
        )


def merge_generate_events(events: list[Any], task: TaskSpec) -> dict[str, Any]:
    """One `/generate` answer from its SSE events (one per token, the last with finish_reason and usage)."""
    if not events:
        raise Mismatch("a stream with no events")
    for event in events:
        if "error" in event:
            raise Mismatch(f"error event in a 200 stream: {event}", 200)
        if len(get(event, "token_ids", list)) != 1:
            raise Mismatch(f"an event with other than one token: {event}")
    if any("finish_reason" in e for e in events[:-1]) or "usage" not in events[-1]:
        raise Mismatch(f"finish_reason/usage not (only) on the last event: {events[-3:]}")
    if len({e.get("id") for e in events}) != 1 or len({e.get("prefix_version") for e in events}) != 1:
        raise Mismatch("events of one stream name different ids or prefix versions")
    return {
        "task_id": task.task_id,
        "prefix_version": events[0].get("prefix_version"),
        "text": "".join(get(e, "text", str) for e in events),
        "token_ids": [t for e in events for t in e["token_ids"]],
        "finish_reason": events[-1].get("finish_reason"),
        "usage": events[-1]["usage"],
    }


def check_completion_usage(usage: Any, prompt: PromptSpec, text: str, finish: Any) -> Answer:
    if finish not in ("length", "stop"):
        raise Mismatch(f"finish_reason {finish!r}")
    num = get(usage, "completion_tokens", int)
    if get(usage, "prompt_tokens", int) != len(prompt.ids) or not 1 <= num <= prompt.max_new:
        raise Mismatch(f"usage {usage} for a {len(prompt.ids)}-token prompt, max_tokens {prompt.max_new}")
    is_total_right = get(usage, "total_tokens", int) == len(prompt.ids) + num
    if not is_total_right or (finish == "length" and num != prompt.max_new):  # EOS as the last: either
        raise Mismatch(f"usage {usage} with finish_reason {finish!r}")
    return Answer(text, finish, num, None)


def merge_completion_chunks(chunks: list[Any], task: TaskSpec) -> tuple[str, Any, Any]:
    """(text, finish_reason, usage) of a streamed `/v1/completions` with include_usage."""
    errors = [c for c in chunks if isinstance(c, dict) and "error" in c]
    if errors:
        raise Mismatch(f"error chunk in a 200 stream: {errors[0]}", 200)
    if len(chunks) < 2 or get(chunks[-1], "choices", list) != []:
        raise Mismatch(f"no usage chunk at the end: {chunks[-2:]}")
    content = chunks[:-1]
    for chunk in content:
        choices = get(chunk, "choices", list)
        if len(choices) != 1 or choices[0].get("index") != 0 or chunk.get("model") != task.task_id:
            raise Mismatch(f"unexpected chunk {chunk}")
    finishes = [c["choices"][0].get("finish_reason") for c in content]
    if any(f is not None for f in finishes[:-1]):
        raise Mismatch(f"finish_reason before the last chunk: {finishes}")
    text = "".join(get(c["choices"][0], "text", str) for c in content)
    return text, finishes[-1], chunks[-1].get("usage")


async def stream(
    ctx: Ctx, path: str, body: dict[str, Any], stop_after: int | None = None
) -> tuple[list[Any], bool]:
    """POST a streaming request: its events and whether `[DONE]` came (see `read_sse`)."""
    headers = ctx.headers_for(str(body.get("task_id") or body.get("model")))
    async with ctx.http.stream("POST", path, json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            expect_status(response, 200)
        return await read_sse(response, stop_after)


async def read_sse(response: httpx.Response, stop_after: int | None = None) -> tuple[list[Any], bool]:
    """The JSON events of a stream and whether `[DONE]` came; returns early after `stop_after` events."""
    events: list[Any] = []
    async for line in response.aiter_lines():
        if not line:
            continue
        if not line.startswith("data: "):
            raise Mismatch(f"not an SSE data line: {line[:100]!r}")
        if line == "data: [DONE]":
            return events, True
        try:
            events.append(json.loads(line[6:]))
        except ValueError as exc:
            raise Mismatch(f"event is not JSON: {line[:100]!r}") from exc
        if stop_after is not None and len(events) >= stop_after:
            return events, False
    return events, False


# ---- operations (each returns its outcome and HTTP status, or raises Mismatch / Lost) -------------
Op = Callable[[Ctx, random.Random], Awaitable[tuple[str, int]]]


def pick(ctx: Ctx, rng: random.Random, stable_only: bool = False) -> tuple[TaskSpec, int, PromptSpec]:
    task = rng.choice(ctx.stable if stable_only else ctx.tasks)
    index = rng.randrange(len(ctx.prompts))
    return task, index, ctx.prompts[index]


def generate_body(
    task: TaskSpec, prompt: PromptSpec, sampling: Sampling, rng: random.Random, **extra: Any
) -> dict[str, Any]:
    """A `/generate` body; the prompt as text or as its token ids (the same request)."""
    body = {"task_id": task.task_id, "max_new_tokens": prompt.max_new, **sampling.body(), **extra}
    if rng.random() < 0.5:
        body["prompt"] = prompt.text
    else:
        body["input_ids"] = list(prompt.ids)
    return body


def completion_body(
    task: TaskSpec, prompt: PromptSpec, sampling: Sampling, rng: random.Random
) -> dict[str, Any]:
    prompt_field: str | list[int] = prompt.text if rng.random() < 0.5 else list(prompt.ids)
    body = {"model": task.task_id, "prompt": prompt_field, "max_tokens": prompt.max_new, **sampling.body()}
    if sampling.seed is None:
        del body["seed"]
    return body


async def op_generate(
    ctx: Ctx, rng: random.Random, sampling: Sampling = GREEDY, kind: str = "generate"
) -> tuple[str, int]:
    task, index, prompt = pick(ctx, rng)
    response = await ctx.http.post(
        "/generate", json=generate_body(task, prompt, sampling, rng), headers=ctx.headers_for(task.task_id)
    )
    expect_status(response, 200)
    version, answer = check_generation(ctx, kind, task, prompt, json_of(response), prompt.max_new)
    check_stable_version(ctx, task, version)
    ctx.refs.check((task.task_id, version, index, sampling), answer)
    return OK, 200


async def op_generate_sampled(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    return await op_generate(ctx, rng, sampled(rng), "generate_sampled")


async def op_generate_stream(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    task, index, prompt = pick(ctx, rng)
    sampling = GREEDY if rng.random() < 0.8 else sampled(rng)
    body = generate_body(task, prompt, sampling, rng, stream=True)
    events, is_done = await stream(ctx, "/generate", body)
    if not is_done:
        raise Lost(f"stream ended without [DONE] after {len(events)} events")
    merged = merge_generate_events(events, task)
    version, answer = check_generation(ctx, "generate_stream", task, prompt, merged, prompt.max_new)
    check_stable_version(ctx, task, version)
    ctx.refs.check((task.task_id, version, index, sampling), answer)
    return OK, 200


async def op_completions(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    task, index, prompt = pick(ctx, rng, stable_only=True)  # no prefix_version in OpenAI's answer
    sampling = GREEDY if rng.random() < 0.8 else sampled(rng)
    response = await ctx.http.post(
        "/v1/completions",
        json=completion_body(task, prompt, sampling, rng),
        headers=ctx.headers_for(task.task_id),
    )
    expect_status(response, 200)
    body = json_of(response)
    choices = get(body, "choices", list)
    if body.get("object") != "text_completion" or body.get("model") != task.task_id or len(choices) != 1:
        raise Mismatch(f"unexpected completion {body}")
    answer = check_completion_usage(
        body.get("usage"), prompt, get(choices[0], "text", str), choices[0].get("finish_reason")
    )
    ctx.refs.check((task.task_id, ctx.first_version(task), index, sampling), answer)
    return OK, 200


async def op_completions_stream(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    task, index, prompt = pick(ctx, rng, stable_only=True)
    sampling = GREEDY if rng.random() < 0.8 else sampled(rng)
    body = {
        **completion_body(task, prompt, sampling, rng),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, is_done = await stream(ctx, "/v1/completions", body)
    if not is_done:
        raise Lost(f"stream ended without [DONE] after {len(chunks)} chunks")
    text, finish, usage = merge_completion_chunks(chunks, task)
    answer = check_completion_usage(usage, prompt, text, finish)
    ctx.refs.check((task.task_id, ctx.first_version(task), index, sampling), answer)
    return OK, 200


async def op_cancel_stream(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    """Open a long stream (64 tokens, EOS ignored) and close it after 1-4 events."""
    task, _, prompt = pick(ctx, rng, stable_only=True)
    if rng.random() < 0.5:
        path, body = "/generate", generate_body(task, prompt, GREEDY, rng, stream=True)
        body.update(max_new_tokens=MAX_NEW_LIMIT, ignore_eos=True)
    else:
        path, body = "/v1/completions", completion_body(task, prompt, GREEDY, rng)
        body.update(max_tokens=MAX_NEW_LIMIT, ignore_eos=True, stream=True)
    wanted = rng.randint(1, 4)
    events, is_done = await stream(ctx, path, body, stop_after=wanted)  # leaving closes the connection
    if is_done or len(events) < wanted:
        raise Lost(f"a {MAX_NEW_LIMIT}-token stream ended after {len(events)} events (done: {is_done})")
    return CANCELLED, 200


async def op_cancel_timeout(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    """A non-streamed 64-token request abandoned after a short wait (the client closes the connection)."""
    task, _, prompt = pick(ctx, rng)
    body = generate_body(task, prompt, GREEDY, rng, max_new_tokens=MAX_NEW_LIMIT, ignore_eos=True)
    try:
        response = await asyncio.wait_for(
            ctx.http.post("/generate", json=body, headers=ctx.headers_for(task.task_id)),
            timeout=rng.uniform(0.02, 0.4),
        )
    except TimeoutError:
        return CANCELLED, 0
    expect_status(response, 200)
    check_generation(ctx, "cancel_timeout", task, prompt, json_of(response), MAX_NEW_LIMIT, ignore_eos=True)
    return OK, 200


async def op_admin_upload(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    """A new version of a churn task: a canonical tensor or a text prefix of a random length."""
    task = rng.choice([t for t in ctx.tasks if t.is_churn])
    length = rng.randint(1, 48)
    if rng.random() < 0.5:
        files: Any = {"text": (None, random_text(rng, length).encode())}
    else:
        files = {
            "weights": ("prefix.safetensors", canonical_prefix(ctx.layout, length, rng.randrange(1 << 30)))
        }
    response = await ctx.http.put(f"/admin/prefixes/{task.task_id}", files=files, headers=ctx.admin)
    expect_status(response, 201)
    body = json_of(response)
    if get(body, "task_id", str) != task.task_id or get(body, "prefix_len", int) != length:
        raise Mismatch(f"upload of a {length}-token prefix to {task.task_id} answered {body}", 201)
    ctx.versions.upload(task.task_id, get(body, "version", int), length)
    return OK, 201


async def op_admin_read(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    """The task list names every task the caller may see (admin: all; with keys, /v1/models: exactly
    the tasks of the key's tenant)."""
    expected = {t.task_id for t in ctx.tasks}
    if rng.random() < 0.5:
        response = await ctx.http.get("/admin/prefixes", params={"limit": 100}, headers=ctx.admin)
        key, name = "items", "task_id"
    else:
        tenant = rng.choice(ctx.tasks).task_id.split(":", 1)[0]
        response = await ctx.http.get("/v1/models", headers=ctx.headers_for(f"{tenant}:x"))
        key, name = "data", "id"
        if ctx.keys:
            expected = {t for t in expected if t.startswith(tenant + ":")}
    expect_status(response, 200)
    listed = {item.get(name) for item in get(json_of(response), key, list)}
    missing = expected - listed
    foreign = listed - expected if ctx.keys and key == "data" else set()
    if missing or foreign:
        raise Mismatch(f"{response.request.url.path} misses {sorted(missing)}, shows {sorted(foreign)}", 200)
    return OK, 200


# ---- bad requests -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BadCase:
    name: str
    method: str
    path: str
    status: int
    code: str
    json: Any = None
    content: bytes | None = None
    files: Any = None
    auth: str = "generation"  # generation | admin | none | wrong


def bad_cases(stable: TaskSpec, layout: tuple[int, int, int]) -> list[BadCase]:
    """Each with the exact status and error code the contract gives it."""
    task, e = stable.task_id, "invalid_request"
    tenant = task.split(":", 1)[0]

    def gen(name: str, status: int, code: str, **changes: Any) -> BadCase:
        body = {"task_id": task, "prompt": "hello", **changes}
        return BadCase(name, "POST", "/generate", status, code, json=body)

    def v1(name: str, status: int, code: str, **body: Any) -> BadCase:
        return BadCase(name, "POST", "/v1/completions", status, code, json={"prompt": "x", **body})

    def up(name: str, status: int, code: str, auth: str = "admin", **files: Any) -> BadCase:
        return BadCase(name, "PUT", f"/admin/prefixes/{task}", status, code, files=files, auth=auth)

    num_layers, heads, head_dim = layout
    nan = safetensors.torch.save({"prefix": torch.full((num_layers, 2, heads, 3, head_dim), float("nan"))})
    wrong = safetensors.torch.save({"prefix": torch.zeros(num_layers + 1, 2, heads, 3, head_dim)})
    return [
        BadCase("malformed_json", "POST", "/generate", 422, e, content=b'{"task_id": "x", "prompt": '),
        gen("unknown_task", 404, "unknown_task", task_id=tenant + ":nothing"),  # inside its key's scope
        gen("bad_task_id", 422, e, task_id="no spaces allowed"),
        gen("negative_temperature", 422, e, temperature=-1),
        gen("top_p_zero", 422, e, top_p=0),
        gen("max_new_zero", 422, e, max_new_tokens=0),
        gen("max_new_over_limit", 422, e, max_new_tokens=MAX_NEW_LIMIT + 1),
        gen("five_stops", 422, e, stop=list("abcde")),
        gen("unknown_field", 422, e, bogus=1),
        gen("prompt_and_ids", 422, e, input_ids=[5]),
        gen("empty_prompt", 422, e, prompt=""),
        gen("token_out_of_vocab", 422, e, prompt=None, input_ids=[10**6]),
        gen("oversize_prompt", 422, "context_too_long", prompt="x" * MAX_POSITIONS),
        v1("v1_unknown_model", 404, "model_not_found", model=tenant + ":nothing"),
        v1("v1_echo", 400, e, model=task, echo=True),
        up("admin_no_token", 401, "unauthorized", auth="none", text=(None, b"x")),
        up("admin_wrong_token", 403, "forbidden", auth="wrong", text=(None, b"x")),
        up("upload_pickle", 422, "invalid_prefix", weights=("w", b"\x80\x04\x95\x00")),  # never unpickled
        up("upload_wrong_shape", 422, "model_mismatch", weights=("w", wrong)),
        up("upload_nan", 422, "invalid_prefix", weights=("w", nan)),
        up("upload_too_large", 413, "too_large", weights=("w", bytes(MAX_UPLOAD_BYTES + 16))),
        up("upload_unknown_part", 422, e, bogus=(None, b"x")),
    ]


def bad_headers(ctx: Ctx, case: BadCase) -> dict[str, str]:
    headers = {
        "generation": ctx.headers_for(ctx.tasks[0].task_id),  # bad_cases() is built on tasks[0]
        "admin": ctx.admin,
        "none": {},
        "wrong": {"Authorization": "Bearer nope"},
    }
    out = dict(headers[case.auth])
    if case.content is not None:
        out["content-type"] = "application/json"
    return out


async def op_bad_request(ctx: Ctx, rng: random.Random) -> tuple[str, int]:
    case = rng.choice(ctx.bad_cases)
    try:
        response = await ctx.http.request(
            case.method,
            case.path,
            json=case.json,
            content=case.content,
            files=case.files,
            headers=bad_headers(ctx, case),
        )
    except httpx.TransportError as exc:
        raise Lost(f"{case.name}: {type(exc).__name__}: {exc!r}") from exc
    ctx.bad_counts[case.name] += 1
    body = json_of(response)
    error = body.get("error") if isinstance(body, dict) else None
    code, message = (error.get("code"), error.get("message")) if isinstance(error, dict) else (None, None)
    if response.status_code != case.status or code != case.code or not message:
        raise Mismatch(
            f"{case.name}: {response.status_code} {response.text[:300]}, wanted {case.status} {case.code!r}",
            response.status_code,
        )
    return OK, response.status_code


OPS: dict[str, Op] = {
    "generate": op_generate,
    "generate_stream": op_generate_stream,
    "generate_sampled": op_generate_sampled,
    "completions": op_completions,
    "completions_stream": op_completions_stream,
    "cancel_stream": op_cancel_stream,
    "cancel_timeout": op_cancel_timeout,
    "bad_request": op_bad_request,
    "admin_upload": op_admin_upload,
    "admin_read": op_admin_read,
}


async def run_op(ctx: Ctx, tally: Tally, kind: str, rng: random.Random) -> None:
    started = time.perf_counter()
    detail = ""
    status: int | None
    try:
        outcome, status = await OPS[kind](ctx, rng)
    except Mismatch as exc:
        outcome, status, detail = WRONG, exc.status, str(exc)
    except (httpx.TransportError, Lost) as exc:  # timeouts, resets, truncated streams
        outcome, status, detail = LOST, None, f"{type(exc).__name__}: {exc}"
    tally.record(kind, outcome, status or None, time.perf_counter() - started, detail)


async def client(ctx: Ctx, tally: Tally, rng: random.Random, deadline: float, mix: dict[str, int]) -> None:
    kinds, weights = list(mix), list(mix.values())
    while time.monotonic() < deadline:
        await run_op(ctx, tally, rng.choices(kinds, weights)[0], rng)


# ---- setup --------------------------------------------------------------------------------------
def canonical_prefix(layout: tuple[int, int, int], length: int, seed: int) -> bytes:
    num_layers, heads, head_dim = layout
    generator = torch.Generator().manual_seed(seed)
    return safetensors.torch.save(
        {"prefix": torch.randn(num_layers, 2, heads, length, head_dim, generator=generator)}
    )


def model_facts(model_dir: Path) -> tuple[tuple[int, int, int], frozenset[int]]:
    """The canonical prefix layout and the EOS ids (generation config first, as the server does)."""
    config = json.loads((model_dir / "config.json").read_text())
    layout = (config["n_layer"], config["n_head"], config["n_embd"] // config["n_head"])
    gen_path = model_dir / "generation_config.json"
    eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.exists() else None
    eos = config["eos_token_id"] if eos is None else eos
    return layout, frozenset(eos if isinstance(eos, list) else [eos])


def build_adapters(model_dir: Path, workdir: Path) -> dict[str, tuple[bytes, bytes]]:
    """PEFT prefix-tuning checkpoints (weights, config) for the PEFT tasks."""
    out: dict[str, tuple[bytes, bytes]] = {}
    for task in task_specs():
        if task.kind == "peft":
            adapter = save_adapter(
                model_dir, workdir / "adapters" / task.task_id, task.prefix_len, seed=len(out)
            )
            out[task.task_id] = (adapter.weights, adapter.config)
    return out


async def upload_initial(
    ctx: Ctx, task: TaskSpec, adapters: dict[str, tuple[bytes, bytes]], seed: int
) -> None:
    files: Any
    if task.kind == "peft":
        weights, config = adapters[task.task_id]
        files = {"weights": ("adapter_model.safetensors", weights), "config": ("adapter_config.json", config)}
    elif task.kind == "text":
        files = {"text": (None, random_text(random.Random(seed), task.prefix_len).encode())}
    else:
        files = {"weights": ("prefix.safetensors", canonical_prefix(ctx.layout, task.prefix_len, seed))}
    response = await ctx.http.put(f"/admin/prefixes/{task.task_id}", files=files, headers=ctx.admin)
    response.raise_for_status()
    body = response.json()
    if body["prefix_len"] != task.prefix_len:
        raise RuntimeError(
            f"{task.task_id}: uploaded prefix_len {body['prefix_len']}, wanted {task.prefix_len}"
        )
    ctx.versions.upload(task.task_id, body["version"], task.prefix_len)


def make_decoder(tokenizer: Any) -> Callable[[tuple[int, ...]], str]:
    @functools.lru_cache(maxsize=100_000)
    def decode(ids: tuple[int, ...]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))

    return decode


async def make_ctx(http: httpx.AsyncClient, served: Served, seed: int, use_keys: bool) -> Ctx:
    """The shared client state, after uploading every task's first version (and, with keys,
    creating one key per tenant: from then on generation needs a key)."""
    layout, eos_ids = model_facts(served.model_dir)
    tasks = task_specs()
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    ctx = Ctx(
        http=http,
        headers=client_headers(),
        admin={"Authorization": f"Bearer {served.admin_token}"},
        tasks=tasks,
        prompts=prompt_specs(tokenizer, random.Random(seed)),
        eos_ids=eos_ids,
        layout=layout,
        bad_cases=bad_cases(tasks[0], layout),
        decode=make_decoder(tokenizer),
    )
    for i, task in enumerate(tasks):
        await upload_initial(ctx, task, served.adapters, seed * 100 + i)
    if use_keys:
        await create_keys(ctx)
    return ctx


async def create_keys(ctx: Ctx) -> None:
    """One unlimited key per tenant, scoped `tenant:*`; and the bad requests only keys make possible."""
    for tenant in TENANTS:
        body = {"name": f"soak-{tenant}", "scopes": [f"{tenant}:*"]}
        response = await ctx.http.post("/admin/keys", json=body, headers=ctx.admin)
        expect_status(response, 201)
        ctx.keys[tenant] = get(json_of(response), "key", str)
    own = ctx.tasks[0].task_id
    foreign = next(t.task_id for t in ctx.tasks if t.task_id.split(":")[0] != own.split(":")[0])
    body = {"task_id": own, "prompt": "hello"}
    ctx.bad_cases += [
        BadCase("gen_without_key", "POST", "/generate", 401, "unauthorized", json=body, auth="none"),
        BadCase("gen_wrong_key", "POST", "/generate", 401, "unauthorized", json=body, auth="wrong"),
        BadCase("gen_foreign_task", "POST", "/generate", 403, "forbidden", json={**body, "task_id": foreign}),
        BadCase(
            "v1_foreign_model",
            "POST",
            "/v1/completions",
            403,
            "forbidden",
            json={"model": foreign, "prompt": "x"},
        ),
    ]


# ---- measurement --------------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def redis_child(pid: int) -> int | None:
    """The embedded redis-server started by the server, if any."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if Path(f"/proc/{child}/comm").read_text().strip() == "redis-server":
            return int(child)
    return None


async def sample_rss(
    pid: int, interval: float, samples: list[tuple[float, int, int]], stop: asyncio.Event
) -> None:
    """(seconds since the traffic began, server RSS KiB, embedded Redis RSS KiB) every `interval`."""
    started, redis = time.monotonic(), redis_child(pid)
    while True:
        samples.append((time.monotonic() - started, rss_kib(pid), rss_kib(redis) if redis else 0))
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except TimeoutError:
            pass


def rss_summary(samples: list[tuple[float, int, int]], warmup: float) -> dict[str, Any]:
    after = [s for s in samples if s[0] >= warmup] or samples[-1:]
    warm, final = after[0], samples[-1]
    peak = max(s[1] for s in after)
    return {
        "warmup_end_s": round(warm[0], 1),
        "warmup_end_mib": warm[1] / 1024,
        "max_mib": peak / 1024,
        "final_mib": final[1] / 1024,
        "growth_pct": 100 * (final[1] - warm[1]) / warm[1],
        "max_growth_pct": 100 * (peak - warm[1]) / warm[1],
        "redis_warmup_end_mib": warm[2] / 1024,
        "redis_final_mib": final[2] / 1024,
        "samples": [[round(t, 1), r, d] for t, r, d in samples],
    }


@dataclass(frozen=True)
class AfterRun:
    """The server once the traffic stopped."""

    gauges: dict[str, float]  # running/waiting/loading requests: all must be back to 0
    server_statuses: dict[str, int]  # `prefix_server_requests_total` summed by status, as the server saw it
    is_healthy: bool


async def after_run(http: httpx.AsyncClient, timeout_s: float = 15.0) -> AfterRun:
    """Polls the gauges until all are 0 (aborted rows leave within a step) or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = (await http.get("/metrics")).text
        gauges = {name: metric_value(text, name) for name in GAUGES}
        if not any(gauges.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    is_healthy = (await http.get("/health")).status_code == 200
    return AfterRun(gauges, server_statuses(text), is_healthy)


def server_statuses(metrics_text: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for line in metrics_text.splitlines():
        if line.startswith("prefix_server_requests_total{") and 'status="' in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] += int(float(line.rsplit(" ", 1)[1]))
    return dict(sorted(counts.items()))


async def final_checks(ctx: Ctx, tally: Tally) -> None:
    """Versions claimed by generations were uploaded with that prefix length; the store holds what we put."""
    for kind, detail in ctx.versions.problems():
        tally.reclassify(kind, detail)
    response = await ctx.http.get("/admin/prefixes", params={"limit": 100}, headers=ctx.admin)
    stored = {item["task_id"]: item for item in response.json()["items"]}
    for task in ctx.tasks:
        versions = ctx.versions.uploaded[task.task_id]
        item = stored.get(task.task_id, {})
        expected = (max(versions), versions[max(versions)])
        ok = (item.get("version"), item.get("prefix_len")) == expected
        tally.record(
            "final_state",
            OK if ok else WRONG,
            200,
            0.0,
            "" if ok else f"{task.task_id}: {item}, wanted {expected}",
        )


def percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- the run ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """The server under test and what it was started with."""

    url: str
    pid: int
    admin_token: str
    model_dir: Path
    adapters: dict[str, tuple[bytes, bytes]]


async def soak(opts: Options, served: Served) -> dict[str, Any]:
    # idle connections expire well before uvicorn's 5 s keep-alive timeout: reusing one the server is
    # closing at that very moment is HTTP/1.1's known race, not a lost request
    limits = httpx.Limits(
        max_connections=opts.clients + 8, max_keepalive_connections=opts.clients + 8, keepalive_expiry=1.0
    )
    async with httpx.AsyncClient(base_url=served.url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        ctx = await make_ctx(http, served, opts.seed, opts.use_keys)
        tally, stop = Tally(), asyncio.Event()
        samples: list[tuple[float, int, int]] = []
        sampler = asyncio.create_task(sample_rss(served.pid, opts.rss_interval, samples, stop))
        started = time.monotonic()
        deadline = started + opts.duration
        rngs = [random.Random(opts.seed * 1000 + i) for i in range(opts.clients)]
        await asyncio.gather(*(client(ctx, tally, rng, deadline, opts.mix) for rng in rngs))
        traffic_s = time.monotonic() - started
        after = await after_run(http)
        await final_checks(ctx, tally)
        stop.set()
        await sampler
    return report(opts, tally, traffic_s, rss_summary(samples, opts.warmup), after, ctx)


def report(
    opts: Options,
    tally: Tally,
    traffic_s: float,
    rss: dict[str, Any],
    after: AfterRun,
    ctx: Ctx,
) -> dict[str, Any]:
    kinds = {kind: kind_row(stats) for kind, stats in sorted(tally.kinds.items())}
    totals = {k: sum(row[k] for row in kinds.values()) for k in ("requests", OK, CANCELLED, LOST, WRONG)}
    totals["status_5xx"] = sum(
        n
        for s in tally.kinds.values()
        for status, n in s.statuses.items()
        if status.isdigit() and int(status) >= 500
    )
    good = [t for kind, s in tally.kinds.items() if kind in GENERATION_KINDS for t in s.latencies_s]
    failures = failure_reasons(totals, rss, after)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": {**asdict(opts), "out": str(opts.out), "docs": str(opts.docs)},
        "traffic_s": traffic_s,
        "requests_per_s": totals["requests"] / traffic_s,
        "totals": totals,
        "good_generation_latency_ms": {"p50": percentile_ms(good, 0.5), "p99": percentile_ms(good, 0.99)},
        "distinct_answers_compared": len(ctx.refs),
        "kinds": kinds,
        "bad_cases": dict(sorted(ctx.bad_counts.items())),
        "uploads": {task: len(versions) for task, versions in sorted(ctx.versions.uploaded.items())},
        "rss": rss,
        "gauges_after": after.gauges,
        "healthy_after": after.is_healthy,
        "server_recorded_statuses": after.server_statuses,
        "problems": tally.problems,
        "passed": not failures,
        "failures": failures,
    }


GENERATION_KINDS = ("generate", "generate_stream", "generate_sampled", "completions", "completions_stream")


def kind_row(stats: KindStats) -> dict[str, Any]:
    return {
        "requests": stats.requests,
        **{k: stats.outcomes[k] for k in (OK, CANCELLED, LOST, WRONG)},
        "statuses": dict(sorted(stats.statuses.items())),
        "p50_ms": percentile_ms(stats.latencies_s, 0.5),
        "p99_ms": percentile_ms(stats.latencies_s, 0.99),
    }


def failure_reasons(totals: dict[str, int], rss: dict[str, Any], after: AfterRun) -> list[str]:
    reasons = [f"{totals[k]} {k}" for k in (LOST, WRONG, "status_5xx") if totals[k]]
    if rss["growth_pct"] >= RSS_LIMIT_PCT:  # the peak is reported, but a transient peak is no leak
        reasons.append(f"RSS grew {rss['growth_pct']:.1f}% after the warm-up")
    reasons += [f"{name} = {value:g} after the run" for name, value in after.gauges.items() if value]
    if not after.is_healthy:
        reasons.append("/health failed after the run")
    return reasons


def warnings_of(result: dict[str, Any]) -> list[str]:
    """What the server itself recorded that the clients could not see (not failures)."""
    found = []
    server_5xx = sum(n for status, n in result["server_recorded_statuses"].items() if int(status) >= 500)
    if server_5xx:
        found.append(
            f"the server's `prefix_server_requests_total` counts {server_5xx} 5xx answers "
            f"(clients saw {result['totals']['status_5xx']})"
        )
    log = result["server_log"]
    if log["num_error_lines"]:
        found.append(
            f"{log['num_error_lines']} ERROR lines in the server log (first in `server_log.first_error`)"
        )
    return found


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# ---- output -----------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| kind | requests | ok | cancelled | lost | wrong | statuses | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for kind, row in result["kinds"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in row["statuses"].items())
        p50, p99 = (f"{v:.0f}" if v is not None else "-" for v in (row["p50_ms"], row["p99_ms"]))
        lines.append(
            f"| {kind} | {row['requests']} | {row[OK]} | {row[CANCELLED]} | {row[LOST]} | {row[WRONG]} "
            f"| {statuses} | {p50} | {p99} |"
        )
    t = result["totals"]
    counts = " | ".join(str(t[k]) for k in ("requests", OK, CANCELLED, LOST, WRONG))
    lines.append(f"| **total** | {counts} | 5xx: {t['status_5xx']} | | |")
    return lines


def summary_lines(result: dict[str, Any]) -> list[str]:
    rss, totals, lat, host = (
        result["rss"],
        result["totals"],
        result["good_generation_latency_ms"],
        result["machine"],
    )
    failures = f" ({'; '.join(result['failures'])})" if result["failures"] else ""
    gauges = ", ".join(f"`{k}` {v:g}" for k, v in result["gauges_after"].items())
    return [
        f"Verdict: **{'PASS' if result['passed'] else 'FAIL'}**{failures}",
        "",
        f"- {result['options']['clients']} clients for {result['traffic_s']:.0f} s on "
        f"{host['cpu_count']} CPUs ({host['platform']}, torch {host['torch']}): "
        f"{result['requests_per_s']:.1f} requests/s.",
        f"- Lost: {totals[LOST]}; mis-answered: {totals[WRONG]}; 5xx: {totals['status_5xx']}; "
        f"{result['distinct_answers_compared']} distinct (task, version, prompt, sampling) answers "
        "cross-checked.",
        f"- Good generations (the five generation kinds): p50 {lat['p50'] or 0:.0f} ms, "
        f"p99 {lat['p99'] or 0:.0f} ms end to end.",
        f"- Server RSS: {rss['warmup_end_mib']:.1f} MiB at the end of the warm-up ({rss['warmup_end_s']} s), "
        f"max {rss['max_mib']:.1f} MiB, final {rss['final_mib']:.1f} MiB: growth {rss['growth_pct']:+.2f}% "
        f"(max {rss['max_growth_pct']:+.2f}%; limit {RSS_LIMIT_PCT:.0f}%). Embedded Redis: "
        f"{rss['redis_warmup_end_mib']:.1f} -> {rss['redis_final_mib']:.1f} MiB.",
        f"- After the run: {gauges}; `/health` {'200' if result['healthy_after'] else 'failed'}.",
        *[f"- Warning: {w}." for w in result["warnings"]],
    ]


INTRO = """\
## Soak test

Produced by `.venv/bin/python bench/soak.py` (by hand, never in CI); JSON in
`bench/results/soak.json`. It starts its own server (a tiny GPT-2, its embedded Redis under a
temporary data dir), uploads 16 tasks (prefix lengths 1-96; canonical tensors, PEFT checkpoints
and text prefixes; three of them re-uploaded during the run) and drives mixed traffic over
loopback: greedy and seeded-sampling generations on `/generate` and `/v1/completions`, streamed
and not; cancellations (streams closed after 1-4 tokens, requests abandoned after 20-400 ms);
bad requests that must get their exact 4xx status and error code; admin uploads and reads.
Unless `--no-keys`, each of the 4 tenants has its own API key scoped to its tasks (`acme:*`, ...):
every generation carries its tenant's key, `/v1/models` must list exactly that tenant's tasks,
and the bad requests include a missing or wrong key (401) and another tenant's task (403).
Every answer to the same (task, prefix version, prompt, sampling) must be identical token for
token whichever endpoint served it, and every 200 must have the contract's shape. *Lost* =
neither a full answer nor a deliberate cancellation. RSS is the server process's `VmRSS`.
"""


def markdown(result: dict[str, Any]) -> str:
    opts = result["options"]
    flags = f"--duration {opts['duration']:g} --clients {opts['clients']} --warmup {opts['warmup']:g}"
    if not opts.get("use_keys", True):
        flags += " --no-keys"
    if opts["mix"] != MIX:
        flags += " --mix " + ",".join(f"{k}={v}" for k, v in opts["mix"].items())
    bad = ", ".join(f"{name} {n}" for name, n in result["bad_cases"].items())
    lines = [INTRO, f"Run of {result['date']}: `{flags}`.", "", *summary_lines(result), "", *table(result)]
    lines += ["", f"Bad requests by case (each must get its exact status and code): {bad}.", ""]
    if result["problems"]:
        lines += ["First problems:", "", *[f"- `{p}`" for p in result["problems"][:20]], ""]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], opts: Options) -> None:
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    if opts.docs is not None:
        write_section(opts.docs, "soak", markdown(result))  # the throughput section stays


# ---- main -------------------------------------------------------------------------------------
def parse_args() -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument(
        "--warmup", type=float, help="seconds before the RSS baseline (default 20%% of --duration)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    parser.add_argument(
        "--docs",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="markdown report (its soak section)",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write the markdown report")
    parser.add_argument("--no-keys", action="store_true", help="development mode: no API keys")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument(
        "--mix", type=parse_mix, default=MIX, help="KIND=WEIGHT,... instead of the default mix (to bisect)"
    )
    args = parser.parse_args()
    warmup = 0.2 * args.duration if args.warmup is None else args.warmup
    docs = None if args.no_docs else args.docs
    return Options(
        args.duration,
        args.clients,
        warmup,
        args.out,
        docs,
        args.seed,
        args.rss_interval,
        args.mix,
        not args.no_keys,
    )


def parse_mix(text: str) -> dict[str, int]:
    mix = {kind: int(weight) for kind, weight in (item.split("=") for item in text.split(","))}
    unknown = set(mix) - set(MIX)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kinds {sorted(unknown)}; known: {', '.join(MIX)}")
    return mix


def server_flags(model_dir: Path, admin_token: str) -> list[str]:
    return [
        "--model", str(model_dir), "--admin-token", admin_token, "--max-model-len", str(MAX_POSITIONS),
        "--max-new-tokens", str(MAX_NEW_LIMIT), "--max-upload-bytes", str(MAX_UPLOAD_BYTES),
        "--log-level", "warning",
    ]  # fmt: skip


def server_log_errors(server: ServerProcess) -> dict[str, Any]:
    """ERROR lines of the server's log (it runs at --log-level warning) and the first traceback in full."""
    lines = server.log_path.read_text(errors="replace").splitlines() if server.log_path.exists() else []
    errors = [i for i, line in enumerate(lines) if " ERROR " in line]
    first = lines[errors[0] : errors[0] + 60] if errors else []
    kinds = Counter(line for line in lines if line and not line.startswith((" ", "Traceback", "The above")))
    return {
        "num_error_lines": len(errors),
        "first_error": first,
        "exception_lines": dict(
            Counter({k: n for k, n in kinds.items() if "Error" in k or "Exception" in k})
        ),
    }


def main() -> None:
    opts = parse_args()
    torch.set_num_threads(1)  # the server needs the cores; this process only builds small tensors
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        model_dir = save_tiny_model("gpt2", workdir / "model", max_positions=MAX_POSITIONS)
        adapters = build_adapters(model_dir, workdir)
        admin_token = secrets.token_urlsafe(16)
        server = ServerProcess(workdir / "data", *server_flags(model_dir, admin_token))
        server.start(timeout_s=300)
        try:
            assert server._proc is not None  # the child's pid: its RSS is what we watch
            served = Served(server.url, server._proc.pid, admin_token, model_dir, adapters)
            result = asyncio.run(soak(opts, served))
        finally:
            server.stop()
        result["server_log"] = server_log_errors(server)
    result["warnings"] = warnings_of(result)
    write_outputs(result, opts)
    print("\n".join(table(result)), "", *summary_lines(result), sep="\n")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
