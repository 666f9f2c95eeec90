"""The soak's verification: outcomes, the tally, the state clients share, and what every answer must be."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.soak_workload import BadCase, PromptSpec, TaskSpec

OK, CANCELLED, LOST, WRONG = "ok", "cancelled", "lost", "wrong"


class Mismatch(Exception):
    """The server answered, but not what the contract says."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.status = status


class Lost(Exception):
    """No full answer arrived (a truncated stream) although the client did not give up."""


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
