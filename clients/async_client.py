"""`AsyncPrefixClient`: the asyncio twin of `PrefixClient`, with the same methods."""

from __future__ import annotations

import builtins  # `builtins.list` in annotations: the clients have a `list` method
from collections.abc import AsyncIterator, Sequence
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

    async def drain(self, grace_s: float | None = None) -> DrainState:
        """Take this replica out of rotation for maintenance (see `PrefixClient.drain`)."""
        return parse_drain_state((await self._send(_drain_call(grace_s))).json())

    async def undrain(self) -> DrainState:
        """Back into rotation after `drain()`."""
        return parse_drain_state((await self._send(_UNDRAIN)).json())

    async def drain_state(self) -> DrainState:
        return parse_drain_state((await self._send(_DRAIN_STATE)).json())

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
        async for payload in self._events(_generate_call(task_id, prompt, input_ids, sampling, True)):
            yield parse_event(payload)

    async def chat(
        self, task_id: str, messages: Sequence[Message], **sampling: Unpack[ChatSampling]
    ) -> ChatCompletion:
        return parse_chat((await self._send(_chat_call(task_id, messages, sampling, False))).json())

    async def chat_stream(
        self, task_id: str, messages: Sequence[Message], **sampling: Unpack[ChatSampling]
    ) -> AsyncIterator[ChatChunk]:
        async for payload in self._events(_chat_call(task_id, messages, sampling, True)):
            yield parse_chat_chunk(payload)

    async def _events(self, call: _Call) -> AsyncIterator[str]:
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
                    yield payload
            raise _incomplete(response)

    async def health(self) -> dict[str, Any]:
        data: dict[str, Any] = (await self._send(_Call("GET", "/health"))).json()
        return data

    async def ready(self) -> bool:
        return (await self._http.get("/ready")).status_code == 200
