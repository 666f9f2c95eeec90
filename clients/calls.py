"""The one implementation behind both clients: every call of the API (method, path, auth, body,
files, and how its answer parses) and the reading of answers and event streams. `PrefixClient`
and `AsyncPrefixClient` only send these calls, blocking or with asyncio."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypedDict, TypeVar
from urllib.parse import quote

import httpx

from clients import models

Progress = Callable[[int, int], None]
Files = dict[str, tuple[str | None, IO[bytes] | bytes, str]]
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class _CommonSampling(TypedDict, total=False):
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: Sequence[str]
    ignore_eos: bool
    frequency_penalty: float  # -2..2, OpenAI's: minus penalty x (times the token was generated)
    presence_penalty: float  # -2..2, OpenAI's: minus penalty once a token was generated
    repetition_penalty: float  # (0, 2], vLLM's / CTRL's: divides a seen token's positive logit


class Sampling(_CommonSampling, total=False):
    """Optional `POST /generate` fields; left out means the server's default."""

    max_new_tokens: int
    add_special_tokens: bool


class ChatSampling(_CommonSampling, total=False):
    """Optional `POST /v1/chat/completions` fields; left out means the server's default."""

    max_tokens: int


Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


class _ProgressReader(io.BufferedReader):
    """The weights as httpx reads them into the multipart body, reporting (sent, total)."""

    def __init__(self, raw: io.RawIOBase | io.BytesIO, total: int, progress: Progress | None) -> None:
        super().__init__(raw)  # type: ignore[arg-type]  # BytesIO has the readinto() it needs
        self.total = total
        self.progress = progress

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if data and self.progress is not None:
            self.progress(self.tell(), self.total)
        return data


# which bearer a call sends: the admin token, or the API key (else the admin token, valid for
# every task); None: no credentials (health checks)
Auth = Literal["admin", "tenant"]
T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request of the API and how its answer reads, independent of sync/async: `parse`
    takes the answer's JSON (None for an empty body), or for a stream each `data:` payload."""

    method: str
    path: str
    parse: Callable[[Any], T]
    auth: Auth | None = None
    params: Mapping[str, str | int] | None = None
    body: Mapping[str, object] | None = None
    files: Callable[[], AbstractContextManager[Files]] | None = None  # opened while the request is sent


def _prefix_path(task_id: str, suffix: str = "") -> str:
    return f"/admin/prefixes/{quote(task_id, safe=':')}{suffix}"


def upload(
    task_id: str, weights: bytes | Path, config: bytes | Path | None, progress: Progress | None
) -> Call[models.PrefixInfo]:
    files = partial(_upload_files, weights, config, progress)
    return Call("PUT", _prefix_path(task_id), models.parse_info, "admin", files=files)


def upload_text(task_id: str, text: str) -> Call[models.PrefixInfo]:
    return Call("PUT", _prefix_path(task_id), models.parse_info, "admin", files=partial(_text_files, text))


def list_page(limit: int, cursor: str | None) -> Call[models.PrefixPage]:
    params: dict[str, str | int] = {"limit": limit}
    if cursor is not None:
        params["cursor"] = cursor
    return Call("GET", "/admin/prefixes", models.parse_page, "admin", params)


def get(task_id: str) -> Call[models.PrefixInfo]:
    return Call("GET", _prefix_path(task_id), models.parse_info, "admin")


def delete(task_id: str) -> Call[None]:
    return Call("DELETE", _prefix_path(task_id), _nothing, "admin")


def warm(task_id: str) -> Call[models.PrefixInfo]:
    return Call("POST", _prefix_path(task_id, "/warm"), models.parse_info, "admin")


def _nothing(data: object) -> None:
    return None


def _generation_body(
    task_id: str, prompt: str | None, input_ids: Sequence[int] | None, sampling: Sampling
) -> dict[str, object]:
    body: dict[str, object] = {"task_id": task_id, **sampling}
    if prompt is not None:
        body["prompt"] = prompt
    if input_ids is not None:
        body["input_ids"] = [int(t) for t in input_ids]
    if "stop" in sampling:
        body["stop"] = [str(s) for s in sampling["stop"]]
    return body


def generate(
    task_id: str, prompt: str | None, input_ids: Sequence[int] | None, sampling: Sampling
) -> Call[models.Generation]:
    body = _generation_body(task_id, prompt, input_ids, sampling)
    return Call("POST", "/generate", models.parse_generation, "tenant", body=body)


def stream(
    task_id: str, prompt: str | None, input_ids: Sequence[int] | None, sampling: Sampling
) -> Call[models.StreamEvent]:
    body = {**_generation_body(task_id, prompt, input_ids, sampling), "stream": True}
    return Call("POST", "/generate", models.parse_event, "tenant", body=body)


def _chat_body(task_id: str, messages: Sequence[Message], sampling: ChatSampling) -> dict[str, object]:
    body: dict[str, object] = {"model": task_id, "messages": [dict(m) for m in messages], **sampling}
    if "stop" in sampling:
        body["stop"] = [str(s) for s in sampling["stop"]]
    return body


def chat(task_id: str, messages: Sequence[Message], sampling: ChatSampling) -> Call[models.ChatCompletion]:
    body = _chat_body(task_id, messages, sampling)
    return Call("POST", "/v1/chat/completions", models.parse_chat, "tenant", body=body)


def chat_stream(task_id: str, messages: Sequence[Message], sampling: ChatSampling) -> Call[models.ChatChunk]:
    # the last chunk carries the usage, as /generate's last event does
    body = {
        **_chat_body(task_id, messages, sampling),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return Call("POST", "/v1/chat/completions", models.parse_chat_chunk, "tenant", body=body)


def create_key(
    name: str, scopes: Sequence[str], requests_per_second: float, tokens_per_minute: int
) -> Call[models.CreatedKey]:
    if isinstance(scopes, str):  # a str is a Sequence[str] too: "acme:*" would become 6 scopes
        raise TypeError(f"scopes must be a list of task ids or prefix* patterns, not the str {scopes!r}")
    body = {
        "name": name,
        "scopes": [str(scope) for scope in scopes],
        "requests_per_second": requests_per_second,
        "tokens_per_minute": tokens_per_minute,
    }
    return Call("POST", "/admin/keys", models.parse_created_key, "admin", body=body)


LIST_KEYS = Call("GET", "/admin/keys", models.parse_keys, "admin")


def revoke_key(key_id: str) -> Call[models.KeyInfo]:
    return Call("DELETE", f"/admin/keys/{quote(key_id, safe='')}", models.parse_key, "admin")


# maintenance of one replica: call it at the replica's own address, not through a proxy
DRAIN_STATE = Call("GET", "/admin/drain", models.parse_drain_state, "admin")
UNDRAIN = Call("DELETE", "/admin/drain", models.parse_drain_state, "admin")


def drain(grace_s: float | None) -> Call[models.DrainState]:
    params = None if grace_s is None else {"grace": str(grace_s)}
    return Call("POST", "/admin/drain", models.parse_drain_state, "admin", params)


HEALTH: Call[dict[str, Any]] = Call("GET", "/health", dict)


def peft_files(directory: Path) -> tuple[Path, Path]:
    """`adapter_model.safetensors` and `adapter_config.json` of a PEFT `save_pretrained` folder."""
    weights, config = directory / PEFT_WEIGHTS, directory / PEFT_CONFIG
    missing = [p.name for p in (weights, config) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a PEFT checkpoint directory: missing {', '.join(missing)} "
            f"(expected {PEFT_WEIGHTS} and {PEFT_CONFIG}, as save_pretrained writes them)"
        )
    return weights, config


@contextmanager
def _upload_files(
    weights: bytes | Path, config: bytes | Path | None, progress: Progress | None
) -> Iterator[Files]:
    if isinstance(weights, Path):
        reader = _ProgressReader(io.FileIO(weights, "r"), weights.stat().st_size, progress)
        name = weights.name
    else:
        reader, name = _ProgressReader(io.BytesIO(weights), len(weights), progress), "prefix.safetensors"
    try:
        files: Files = {"weights": (name, reader, "application/octet-stream")}
        if config is not None:
            data = config.read_bytes() if isinstance(config, Path) else config
            files["config"] = (PEFT_CONFIG, data, "application/json")
        yield files
    finally:
        reader.close()


@contextmanager
def _text_files(text: str) -> Iterator[Files]:
    # no filename: a plain form field, which the server reads as UTF-8 text
    yield {"text": (None, text.encode("utf-8"), "text/plain; charset=utf-8")}


class ClientBase:
    """`token` is the admin token (admin calls); `api_key` a tenant API key for generation, which
    falls back to the admin token (valid for every task) when not given."""

    def __init__(self, url: str, token: str | None, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.api_key = api_key

    def _request(self, call: Call[Any], files: Files | None = None) -> dict[str, Any]:
        """httpx's arguments for `call`."""
        bearer = {"admin": self.token, "tenant": self.api_key or self.token, None: None}[call.auth]
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        return dict(
            method=call.method,
            url=call.path,
            params=call.params,
            json=call.body,
            files=files,
            headers=headers,
        )


def answer(call: Call[T], response: httpx.Response) -> T:
    """What `call`'s (read) answer says; PrefixServerError unless it is a 2xx."""
    if not response.is_success:
        raise models.error_from_response(response)
    return call.parse(response.json() if response.content else None)


class EventReader(Generic[T]):
    """Reads a `text/event-stream` answer, line by line, into `call`'s events up to `[DONE]`."""

    def __init__(self, call: Call[T]) -> None:
        self.call = call
        self.is_done = False

    def read(self, line: str) -> list[T]:
        payload = line[len("data:") :].strip() if line.startswith("data:") else None
        if payload == "[DONE]":
            self.is_done = True
        return [self.call.parse(payload)] if payload and not self.is_done else []


def incomplete(response: httpx.Response) -> models.PrefixServerError:
    return models.PrefixServerError(
        response.status_code, "incomplete_stream", "the event stream ended before [DONE]"
    )
