"""Python clients of the prefix server: `PrefixClient` (sync) and `AsyncPrefixClient`
(clients/async_client.py). Both have the same methods; every non-2xx answer raises
`PrefixServerError`."""

from __future__ import annotations

import builtins  # `builtins.list` in annotations: the clients have a `list` method
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Unpack

import httpx

from clients.calls import (
    _DRAIN_STATE,
    _LIST_KEYS,
    _UNDRAIN,
    ChatSampling,
    Files,
    Message,
    Progress,
    Sampling,
    _Base,
    _Call,
    _chat_call,
    _create_key_call,
    _drain_call,
    _generate_call,
    _incomplete,
    _key_path,
    _list_call,
    _prefix_path,
    _sse_payload,
    _text_files,
    _upload_files,
    peft_files,
)
from clients.models import (
    ChatChunk,
    ChatCompletion,
    CreatedKey,
    DrainState,
    Generation,
    KeyInfo,
    PrefixInfo,
    PrefixPage,
    StreamEvent,
    error_from_response,
    parse_chat,
    parse_chat_chunk,
    parse_created_key,
    parse_drain_state,
    parse_event,
    parse_generation,
    parse_info,
    parse_key,
    parse_keys,
    parse_page,
)


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

    def drain(self, grace_s: float | None = None) -> DrainState:
        """Take this replica out of rotation for maintenance: `/ready` fails (a proxy stops
        sending work), running requests finish, and after `grace_s` (server default 3 s: the
        time a proxy's health checks take to notice) new generations get a retry-safe 503; poll
        `drain_state()` until `drained`. Use the replica's own URL, not the proxy's."""
        return parse_drain_state(self._send(_drain_call(grace_s)).json())

    def undrain(self) -> DrainState:
        """Back into rotation after `drain()` (409 `shutting_down` after a SIGTERM)."""
        return parse_drain_state(self._send(_UNDRAIN).json())

    def drain_state(self) -> DrainState:
        return parse_drain_state(self._send(_DRAIN_STATE).json())

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
        for payload in self._events(_generate_call(task_id, prompt, input_ids, sampling, True)):
            yield parse_event(payload)

    def chat(
        self, task_id: str, messages: Sequence[Message], **sampling: Unpack[ChatSampling]
    ) -> ChatCompletion:
        """The assistant's answer to `messages`, rendered by the model's chat template, with
        `task_id`'s prefix (`POST /v1/chat/completions`, `model` = task id)."""
        return parse_chat(self._send(_chat_call(task_id, messages, sampling, False)).json())

    def chat_stream(
        self, task_id: str, messages: Sequence[Message], **sampling: Unpack[ChatSampling]
    ) -> Iterator[ChatChunk]:
        """`chat` as it is generated: content pieces, then `finish_reason`, then `usage`."""
        for payload in self._events(_chat_call(task_id, messages, sampling, True)):
            yield parse_chat_chunk(payload)

    def _events(self, call: _Call) -> Iterator[str]:
        """The `data:` payloads of a server-sent event stream, up to `[DONE]`."""
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
                    yield payload
            raise _incomplete(response)

    def health(self) -> dict[str, Any]:
        data: dict[str, Any] = self._send(_Call("GET", "/health")).json()
        return data

    def ready(self) -> bool:
        """True when `/ready` answers 200 (model loaded, engine running, store reachable)."""
        return self._http.get("/ready").status_code == 200


from clients.async_client import AsyncPrefixClient  # noqa: E402  # one import place for both clients

__all__ = [
    "AsyncPrefixClient",
    "ChatSampling",
    "Message",
    "PrefixClient",
    "Progress",
    "Sampling",
    "peft_files",
]
