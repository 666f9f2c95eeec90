"""Python clients of the prefix server: `PrefixClient` (sync) and `AsyncPrefixClient`.

Both have the same methods; every non-2xx answer raises `PrefixServerError`.
"""

from __future__ import annotations

import builtins  # `builtins.list` in annotations: the clients have a `list` method
import io
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypedDict, Unpack
from urllib.parse import quote

import httpx

from clients.models import (
    CreatedKey,
    Generation,
    KeyInfo,
    PrefixInfo,
    PrefixPage,
    PrefixServerError,
    StreamEvent,
    error_from_response,
    parse_created_key,
    parse_event,
    parse_generation,
    parse_info,
    parse_key,
    parse_keys,
    parse_page,
)

Progress = Callable[[int, int], None]
Files = dict[str, tuple[str | None, IO[bytes] | bytes, str]]
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class Sampling(TypedDict, total=False):
    """Optional `POST /generate` fields; left out means the server's default."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: Sequence[str]
    ignore_eos: bool
    add_special_tokens: bool


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


class PrefixClient(_Base):
    """Blocking client; use as a context manager or call `close()`."""

    def __init__(
        self, url: str, token: str | None = None, timeout: float = 300, *, api_key: str | None = None
    ) -> None:
        super().__init__(url, token, api_key)
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrefixClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: _Call, files: Files | None = None) -> httpx.Response:
        response = self._http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.body,
            files=files,
            headers=self._headers(call),
        )
        if not response.is_success:
            raise error_from_response(response)
        return response

    def upload(
        self,
        task_id: str,
        weights: bytes | Path,
        config: bytes | Path | None = None,
        progress: Progress | None = None,
    ) -> PrefixInfo:
        """PUT a canonical safetensors prefix, or a PEFT checkpoint when `config` is given."""
        with _upload_files(weights, config, progress) as files:
            return parse_info(self._send(_Call("PUT", _prefix_path(task_id), "admin"), files).json())

    def upload_peft_dir(self, task_id: str, directory: Path, progress: Progress | None = None) -> PrefixInfo:
        """Upload the folder PEFT's `save_pretrained` wrote."""
        weights, config = peft_files(directory)
        return self.upload(task_id, weights, config, progress)

    def upload_text(self, task_id: str, text: str) -> PrefixInfo:
        """A plain-text prefix, which the server runs through the model once."""
        return parse_info(self._send(_Call("PUT", _prefix_path(task_id), "admin"), _text_files(text)).json())

    def list(self, limit: int = 100, cursor: str | None = None) -> PrefixPage:
        return parse_page(self._send(_list_call(limit, cursor)).json())

    def iter_prefixes(self, page_size: int = 100) -> Iterator[PrefixInfo]:
        """Every prefix, following `next_cursor` page by page."""
        cursor: str | None = None
        while True:
            page = self.list(page_size, cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def get(self, task_id: str) -> PrefixInfo:
        return parse_info(self._send(_Call("GET", _prefix_path(task_id), "admin")).json())

    def delete(self, task_id: str) -> None:
        self._send(_Call("DELETE", _prefix_path(task_id), "admin"))

    def warm(self, task_id: str) -> PrefixInfo:
        """Prefetch into the server's caches; `tiers` of the result says where it now is."""
        return parse_info(self._send(_Call("POST", _prefix_path(task_id, "/warm"), "admin")).json())

    def create_key(
        self, name: str, scopes: Sequence[str], requests_per_second: float = 0, tokens_per_minute: int = 0
    ) -> CreatedKey:
        """A new tenant API key for `scopes` (task ids or `prefix*` patterns; 0 = unlimited rate).
        Its secret, `CreatedKey.key`, is in this answer only. The first key ends the server's
        open development mode for good."""
        call = _create_key_call(name, scopes, requests_per_second, tokens_per_minute)
        return parse_created_key(self._send(call).json())

    def list_keys(self) -> builtins.list[KeyInfo]:
        return parse_keys(self._send(_LIST_KEYS).json())

    def revoke_key(self, key_id: str) -> KeyInfo:
        """Revoke a key (refused from the next request on); returns what it was."""
        return parse_key(self._send(_Call("DELETE", _key_path(key_id), "admin")).json())

    def generate(
        self,
        task_id: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        **sampling: Unpack[Sampling],
    ) -> Generation:
        """Send exactly one of `prompt` (text) or `input_ids`."""
        return parse_generation(
            self._send(_generate_call(task_id, prompt, input_ids, sampling, False)).json()
        )

    def stream(
        self,
        task_id: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        **sampling: Unpack[Sampling],
    ) -> Iterator[StreamEvent]:
        """Events as the server sends them; the request is made on the first `next()`."""
        call = _generate_call(task_id, prompt, input_ids, sampling, True)
        with self._http.stream(
            call.method, call.path, json=call.body, headers=self._headers(call)
        ) as response:
            if not response.is_success:
                response.read()
                raise error_from_response(response)
            for line in response.iter_lines():
                payload = _sse_payload(line)
                if payload == "[DONE]":
                    return
                if payload:
                    yield parse_event(payload)
            raise _incomplete(response)

    def health(self) -> dict[str, Any]:
        data: dict[str, Any] = self._send(_Call("GET", "/health")).json()
        return data

    def ready(self) -> bool:
        """True when `/ready` answers 200 (model loaded, engine running, store reachable)."""
        return self._http.get("/ready").status_code == 200


class AsyncPrefixClient(_Base):
    """`PrefixClient` for asyncio; use `async with` or `await aclose()`."""

    def __init__(
        self, url: str, token: str | None = None, timeout: float = 300, *, api_key: str | None = None
    ) -> None:
        super().__init__(url, token, api_key)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncPrefixClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send(self, call: _Call, files: Files | None = None) -> httpx.Response:
        response = await self._http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.body,
            files=files,
            headers=self._headers(call),
        )
        if not response.is_success:
            raise error_from_response(response)
        return response

    async def upload(
        self,
        task_id: str,
        weights: bytes | Path,
        config: bytes | Path | None = None,
        progress: Progress | None = None,
    ) -> PrefixInfo:
        with _upload_files(weights, config, progress) as files:
            return parse_info((await self._send(_Call("PUT", _prefix_path(task_id), "admin"), files)).json())

    async def upload_peft_dir(
        self, task_id: str, directory: Path, progress: Progress | None = None
    ) -> PrefixInfo:
        weights, config = peft_files(directory)
        return await self.upload(task_id, weights, config, progress)

    async def upload_text(self, task_id: str, text: str) -> PrefixInfo:
        response = await self._send(_Call("PUT", _prefix_path(task_id), "admin"), _text_files(text))
        return parse_info(response.json())

    async def list(self, limit: int = 100, cursor: str | None = None) -> PrefixPage:
        return parse_page((await self._send(_list_call(limit, cursor))).json())

    async def iter_prefixes(self, page_size: int = 100) -> AsyncIterator[PrefixInfo]:
        cursor: str | None = None
        while True:
            page = await self.list(page_size, cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def get(self, task_id: str) -> PrefixInfo:
        return parse_info((await self._send(_Call("GET", _prefix_path(task_id), "admin"))).json())

    async def delete(self, task_id: str) -> None:
        await self._send(_Call("DELETE", _prefix_path(task_id), "admin"))

    async def warm(self, task_id: str) -> PrefixInfo:
        return parse_info((await self._send(_Call("POST", _prefix_path(task_id, "/warm"), "admin"))).json())

    async def create_key(
        self, name: str, scopes: Sequence[str], requests_per_second: float = 0, tokens_per_minute: int = 0
    ) -> CreatedKey:
        call = _create_key_call(name, scopes, requests_per_second, tokens_per_minute)
        return parse_created_key((await self._send(call)).json())

    async def list_keys(self) -> builtins.list[KeyInfo]:
        return parse_keys((await self._send(_LIST_KEYS)).json())

    async def revoke_key(self, key_id: str) -> KeyInfo:
        return parse_key((await self._send(_Call("DELETE", _key_path(key_id), "admin"))).json())

    async def generate(
        self,
        task_id: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        **sampling: Unpack[Sampling],
    ) -> Generation:
        response = await self._send(_generate_call(task_id, prompt, input_ids, sampling, False))
        return parse_generation(response.json())

    async def stream(
        self,
        task_id: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        **sampling: Unpack[Sampling],
    ) -> AsyncIterator[StreamEvent]:
        call = _generate_call(task_id, prompt, input_ids, sampling, True)
        async with self._http.stream(
            call.method, call.path, json=call.body, headers=self._headers(call)
        ) as response:
            if not response.is_success:
                await response.aread()
                raise error_from_response(response)
            async for line in response.aiter_lines():
                payload = _sse_payload(line)
                if payload == "[DONE]":
                    return
                if payload:
                    yield parse_event(payload)
            raise _incomplete(response)

    async def health(self) -> dict[str, Any]:
        data: dict[str, Any] = (await self._send(_Call("GET", "/health"))).json()
        return data

    async def ready(self) -> bool:
        return (await self._http.get("/ready")).status_code == 200


__all__ = ["AsyncPrefixClient", "PrefixClient", "Sampling", "peft_files"]
