"""`AsyncPrefixClient`: the asyncio twin of `PrefixClient`, with the same methods (documented
there), each one call of `clients.calls`."""

from __future__ import annotations

import builtins  # `builtins.list` in annotations: the clients have a `list` method
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx

from clients import calls, models
from clients.calls import ChatSampling, EventReader, Message, Progress, Sampling, peft_files

T = TypeVar("T")


class AsyncPrefixClient(calls.ClientBase):
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

    async def _do(self, call: calls.Call[T]) -> T:
        if call.files is None:
            return calls.answer(call, await self._http.request(**self._request(call)))
        with call.files() as files:
            return calls.answer(call, await self._http.request(**self._request(call, files)))

    async def _events(self, call: calls.Call[T]) -> AsyncIterator[T]:
        async with self._http.stream(**self._request(call)) as response:
            if not response.is_success:
                await response.aread()
                raise models.error_from_response(response)
            reader = EventReader(call)
            async for line in response.aiter_lines():
                for event in reader.read(line):
                    yield event
                if reader.is_done:
                    return
            raise calls.incomplete(response)

    async def upload(
        self,
        task_id: str,
        weights: bytes | Path,
        config: bytes | Path | None = None,
        progress: Progress | None = None,
    ) -> models.PrefixInfo:
        return await self._do(calls.upload(task_id, weights, config, progress))

    async def upload_peft_dir(
        self, task_id: str, directory: Path, progress: Progress | None = None
    ) -> models.PrefixInfo:
        return await self.upload(task_id, *peft_files(directory), progress)

    async def upload_text(self, task_id: str, text: str) -> models.PrefixInfo:
        return await self._do(calls.upload_text(task_id, text))

    async def list(self, limit: int = 100, cursor: str | None = None) -> models.PrefixPage:
        return await self._do(calls.list_page(limit, cursor))

    async def iter_prefixes(self, page_size: int = 100) -> AsyncIterator[models.PrefixInfo]:
        cursor: str | None = None
        while cursor != "":  # "": the last page was read
            page = await self.list(page_size, cursor)
            for item in page.items:
                yield item
            cursor = page.next_cursor or ""

    async def get(self, task_id: str) -> models.PrefixInfo:
        return await self._do(calls.get(task_id))

    async def delete(self, task_id: str) -> None:
        await self._do(calls.delete(task_id))

    async def warm(self, task_id: str) -> models.PrefixInfo:
        return await self._do(calls.warm(task_id))

    async def create_key(
        self, name: str, scopes: Sequence[str], requests_per_second: float = 0, tokens_per_minute: int = 0
    ) -> models.CreatedKey:
        return await self._do(calls.create_key(name, scopes, requests_per_second, tokens_per_minute))

    async def list_keys(self) -> builtins.list[models.KeyInfo]:
        return await self._do(calls.LIST_KEYS)

    async def revoke_key(self, key_id: str) -> models.KeyInfo:
        return await self._do(calls.revoke_key(key_id))

    async def drain(self, grace_s: float | None = None) -> models.DrainState:
        return await self._do(calls.drain(grace_s))

    async def undrain(self) -> models.DrainState:
        return await self._do(calls.UNDRAIN)

    async def drain_state(self) -> models.DrainState:
        return await self._do(calls.DRAIN_STATE)

    async def generate(
        self,
        task_id: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        **sampling: Unpack[Sampling],
    ) -> models.Generation:
        return await self._do(calls.generate(task_id, prompt, input_ids, sampling))

    def stream(
        self,
        task_id: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        **sampling: Unpack[Sampling],
    ) -> AsyncIterator[models.StreamEvent]:
        return self._events(calls.stream(task_id, prompt, input_ids, sampling))

    async def chat(
        self, task_id: str, messages: Sequence[Message], **sampling: Unpack[ChatSampling]
    ) -> models.ChatCompletion:
        return await self._do(calls.chat(task_id, messages, sampling))

    def chat_stream(
        self, task_id: str, messages: Sequence[Message], **sampling: Unpack[ChatSampling]
    ) -> AsyncIterator[models.ChatChunk]:
        return self._events(calls.chat_stream(task_id, messages, sampling))

    async def health(self) -> dict[str, Any]:
        return await self._do(calls.HEALTH)

    async def ready(self) -> bool:
        return (await self._http.get("/ready")).status_code == 200
