"""Typed results and the error of the prefix server's HTTP API, and their parsing from JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import httpx

from prefix_store.meta import ApiKey, CreatedKey, PrefixMeta

KeyInfo = ApiKey  # the server's own record of a tenant API key (never its secret), as PrefixInfo is


class PrefixServerError(Exception):
    """Any non-2xx answer: the HTTP status, the contract's error `code` and `message`, and
    `Retry-After` in seconds when the server sent one (429 `overloaded`, 503)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class PrefixInfo(PrefixMeta):
    """One stored prefix's metadata: the server's own `PrefixMeta`. `source` is how it was made
    (None from a server too old to say); `tiers` is only set by `warm()`: the cache tiers now
    holding it."""

    source: str | None = None  # type: ignore[assignment]  # older servers do not send it
    tiers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PrefixPage:
    """One page of `GET /admin/prefixes`; `next_cursor` is None on the last page."""

    items: tuple[PrefixInfo, ...]
    next_cursor: str | None


@dataclass(frozen=True)
class Generation:
    """A finished `POST /generate` answer; `finish_reason` is `length`, `stop` or `eos`."""

    id: str
    task_id: str
    prefix_version: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prefix_tokens: int


@dataclass(frozen=True)
class Usage:
    """Token counts of a streamed generation (`prefix_tokens`: 0 in chat, which does not report it)."""

    prompt_tokens: int
    completion_tokens: int
    prefix_tokens: int = 0


@dataclass(frozen=True)
class StreamEvent:
    """One server-sent event of a streamed generation; the last one carries
    `finish_reason`, `usage` and `prefix_version`."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    prefix_version: int | None = None


@dataclass(frozen=True)
class ChatCompletion:
    """The assistant's answer of `POST /v1/chat/completions` (its first choice)."""

    id: str
    model: str
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ChatChunk:
    """One streamed piece of the answer; the last one has `finish_reason`, then one has `usage`."""

    content: str
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class DrainState:
    """`/admin/drain` of one replica: `draining` (`/ready` 503) by `maintenance` (`drain()`,
    undone by `undrain()`) or `shutting_down` (SIGTERM); `refusing` new generations (after the
    drain's grace); `drained` once refusing and nothing is in flight any more."""

    draining: bool
    refusing: bool
    maintenance: bool
    shutting_down: bool
    requests_in_flight: int
    generations_running: int
    generations_waiting: int
    drained: bool


def parse_drain_state(data: Mapping[str, Any]) -> DrainState:
    return DrainState(
        draining=bool(data["draining"]),
        refusing=bool(data["refusing"]),
        maintenance=bool(data["maintenance"]),
        shutting_down=bool(data["shutting_down"]),
        requests_in_flight=int(data["requests_in_flight"]),
        generations_running=int(data["generations_running"]),
        generations_waiting=int(data["generations_waiting"]),
        drained=bool(data["drained"]),
    )


def parse_info(data: Mapping[str, Any]) -> PrefixInfo:
    """The fields `PrefixInfo` knows, converted to their types (unknown fields are ignored)."""
    known: dict[str, Any] = {f.name: f.type for f in fields(PrefixMeta) if f.name != "source"}
    values = {name: convert(data[name]) for name, convert in known.items()}  # int(...) / str(...)
    source, tiers = data.get("source"), data.get("tiers")
    values["source"] = None if source is None else str(source)
    values["tiers"] = None if tiers is None else tuple(str(t) for t in tiers)
    return PrefixInfo(**values)


def parse_page(data: Mapping[str, Any]) -> PrefixPage:
    return PrefixPage(tuple(parse_info(item) for item in data["items"]), data.get("next_cursor"))


def parse_generation(data: Mapping[str, Any]) -> Generation:
    usage = data["usage"]
    return Generation(
        id=str(data["id"]),
        task_id=str(data["task_id"]),
        prefix_version=int(data["prefix_version"]),
        text=str(data["text"]),
        token_ids=tuple(int(t) for t in data["token_ids"]),
        finish_reason=str(data["finish_reason"]),
        prompt_tokens=int(usage["prompt_tokens"]),
        completion_tokens=int(usage["completion_tokens"]),
        prefix_tokens=int(usage["prefix_tokens"]),
    )


def parse_key(data: Mapping[str, Any]) -> KeyInfo:
    return KeyInfo(
        id=str(data["id"]),
        name=str(data["name"]),
        scopes=tuple(str(s) for s in data["scopes"]),
        requests_per_second=float(data["requests_per_second"]),
        tokens_per_minute=int(data["tokens_per_minute"]),
        created_at=str(data["created_at"]),
    )


def parse_created_key(data: Mapping[str, Any]) -> CreatedKey:
    return CreatedKey(**vars(parse_key(data)), key=str(data["key"]))


def parse_keys(data: Mapping[str, Any]) -> list[KeyInfo]:
    return [parse_key(item) for item in data["items"]]


def _usage(data: Mapping[str, Any] | None) -> Usage | None:
    if data is None:
        return None
    prompt, completion = int(data["prompt_tokens"]), int(data["completion_tokens"])
    return Usage(prompt, completion, int(data.get("prefix_tokens", 0)))


def parse_event(payload: str) -> StreamEvent:
    """The event in one SSE `data:` payload (not `[DONE]`). A final event that carries
    `error` (generation failed mid-stream) raises PrefixServerError with status 500."""
    data = json.loads(payload)
    if data.get("error"):
        error = data["error"]
        raise PrefixServerError(500, str(error.get("code")), str(error.get("message")))
    return StreamEvent(
        token_ids=tuple(int(t) for t in data.get("token_ids", ())),
        text=str(data.get("text", "")),
        finish_reason=data.get("finish_reason"),
        usage=_usage(data.get("usage")),
        prefix_version=data.get("prefix_version"),
    )


def parse_chat(data: Mapping[str, Any]) -> ChatCompletion:
    choice, usage = data["choices"][0], data["usage"]
    return ChatCompletion(
        id=str(data["id"]),
        model=str(data["model"]),
        content=str(choice["message"]["content"] or ""),
        finish_reason=str(choice["finish_reason"]),
        prompt_tokens=int(usage["prompt_tokens"]),
        completion_tokens=int(usage["completion_tokens"]),
    )


def parse_chat_chunk(payload: str) -> ChatChunk:
    """The chunk in one SSE `data:` payload (not `[DONE]`); an `error` chunk raises."""
    data = json.loads(payload)
    if data.get("error"):
        error = data["error"]
        raise PrefixServerError(500, str(error.get("code")), str(error.get("message")))
    choices = data.get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    return ChatChunk(
        content=str(delta.get("content") or ""),
        finish_reason=choices[0].get("finish_reason"),
        usage=_usage(data.get("usage")),
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return None if value is None else float(value)
    except ValueError:  # an HTTP date: not worth a parser here
        return None


def error_from_response(response: httpx.Response) -> PrefixServerError:
    """The error of a non-2xx answer (its body must have been read)."""
    code, message = "http_error", response.reason_phrase or f"HTTP {response.status_code}"
    try:
        detail = response.json()["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        if response.text.strip():
            message = f"{message}: {response.text.strip()[:500]}"
    return PrefixServerError(response.status_code, code, message, _retry_after(response))
