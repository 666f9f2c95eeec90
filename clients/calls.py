"""What both clients share: the calls (method, path, auth, body), upload files, progress,
and the base that holds the server URL and tokens."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, TypedDict
from urllib.parse import quote

import httpx

from clients.models import (
    PrefixServerError,
)

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
_Auth = Literal["admin", "tenant"]


@dataclass(frozen=True)
class _Call:
    """One HTTP request of the API, independent of sync/async."""

    method: str
    path: str
    auth: _Auth | None = None
    params: Mapping[str, str | int] | None = None
    body: Mapping[str, object] | None = None


def _prefix_path(task_id: str, suffix: str = "") -> str:
    return f"/admin/prefixes/{quote(task_id, safe=':')}{suffix}"


def _list_call(limit: int, cursor: str | None) -> _Call:
    params: dict[str, str | int] = {"limit": limit}
    if cursor is not None:
        params["cursor"] = cursor
    return _Call("GET", "/admin/prefixes", "admin", params)


def _generate_call(
    task_id: str, prompt: str | None, input_ids: Sequence[int] | None, sampling: Sampling, stream: bool
) -> _Call:
    body: dict[str, object] = {"task_id": task_id, **sampling}
    if prompt is not None:
        body["prompt"] = prompt
    if input_ids is not None:
        body["input_ids"] = [int(t) for t in input_ids]
    if "stop" in sampling:
        body["stop"] = [str(s) for s in sampling["stop"]]
    if stream:
        body["stream"] = True
    return _Call("POST", "/generate", "tenant", body=body)


def _chat_call(task_id: str, messages: Sequence[Message], sampling: ChatSampling, stream: bool) -> _Call:
    body: dict[str, object] = {"model": task_id, "messages": [dict(m) for m in messages], **sampling}
    if "stop" in sampling:
        body["stop"] = [str(s) for s in sampling["stop"]]
    if stream:  # the last chunk carries the usage, as /generate's last event does
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return _Call("POST", "/v1/chat/completions", "tenant", body=body)


def _key_path(key_id: str) -> str:
    return f"/admin/keys/{quote(key_id, safe='')}"


def _create_key_call(
    name: str, scopes: Sequence[str], requests_per_second: float, tokens_per_minute: int
) -> _Call:
    if isinstance(scopes, str):  # a str is a Sequence[str] too: "acme:*" would become 6 scopes
        raise TypeError(f"scopes must be a list of task ids or prefix* patterns, not the str {scopes!r}")
    body = {
        "name": name,
        "scopes": [str(scope) for scope in scopes],
        "requests_per_second": requests_per_second,
        "tokens_per_minute": tokens_per_minute,
    }
    return _Call("POST", "/admin/keys", "admin", body=body)


_LIST_KEYS = _Call("GET", "/admin/keys", "admin")

# maintenance of one replica: call it at the replica's own address, not through a proxy
_DRAIN_STATE = _Call("GET", "/admin/drain", "admin")


def _drain_call(grace_s: float | None) -> _Call:
    return _Call("POST", "/admin/drain", "admin", None if grace_s is None else {"grace": str(grace_s)})


_UNDRAIN = _Call("DELETE", "/admin/drain", "admin")


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


def _text_files(text: str) -> Files:
    # no filename: a plain form field, which the server reads as UTF-8 text
    return {"text": (None, text.encode("utf-8"), "text/plain; charset=utf-8")}


def _sse_payload(line: str) -> str | None:
    return line[len("data:") :].strip() if line.startswith("data:") else None


def _incomplete(response: httpx.Response) -> PrefixServerError:
    return PrefixServerError(
        response.status_code, "incomplete_stream", "the event stream ended before [DONE]"
    )


class _Base:
    """`token` is the admin token (admin calls); `api_key` a tenant API key for generation, which
    falls back to the admin token (valid for every task) when not given."""

    def __init__(self, url: str, token: str | None, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.api_key = api_key

    def _headers(self, call: _Call) -> dict[str, str]:
        if call.auth == "admin":
            bearer = self.token
        elif call.auth == "tenant":
            bearer = self.api_key or self.token
        else:
            bearer = None
        return {"Authorization": f"Bearer {bearer}"} if bearer else {}
