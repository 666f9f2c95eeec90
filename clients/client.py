"""Python clients of the prefix server: `PrefixClient` (sync) and `AsyncPrefixClient`
(clients/async_client.py). Both have the same methods, each one call of `clients.calls` (where
requests are built and answers parsed); every non-2xx answer raises `PrefixServerError`."""

from __future__ import annotations

import builtins  # `builtins.list` in annotations: the clients have a `list` method
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx

from clients import calls
from clients.calls import ChatSampling, EventReader, Message, Progress, Sampling, peft_files
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
)

T = TypeVar("T")


class PrefixClient(calls.ClientBase):
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

    def _do(self, call: calls.Call[T]) -> T:
        if call.files is None:
            return calls.answer(call, self._http.request(**self._request(call)))
        with call.files() as files:
            return calls.answer(call, self._http.request(**self._request(call, files)))

    def _events(self, call: calls.Call[T]) -> Iterator[T]:
        """The events of a server-sent event stream, up to `[DONE]`; the request is made on the
        first `next()`."""
        with self._http.stream(**self._request(call)) as response:
            if not response.is_success:
                response.read()
                raise error_from_response(response)
            reader = EventReader(call)
            for line in response.iter_lines():
                yield from reader.read(line)
                if reader.is_done:
                    return
            raise calls.incomplete(response)

    def upload(
        self,
        task_id: str,
        weights: bytes | Path,
        config: bytes | Path | None = None,
        progress: Progress | None = None,
    ) -> PrefixInfo:
        """PUT a canonical safetensors prefix, or a PEFT checkpoint when `config` is given."""
        return self._do(calls.upload(task_id, weights, config, progress))

    def upload_peft_dir(self, task_id: str, directory: Path, progress: Progress | None = None) -> PrefixInfo:
        """Upload the folder PEFT's `save_pretrained` wrote."""
        return self.upload(task_id, *peft_files(directory), progress)

    def upload_text(self, task_id: str, text: str) -> PrefixInfo:
        """A plain-text prefix, which the server runs through the model once."""
        return self._do(calls.upload_text(task_id, text))

    def list(self, limit: int = 100, cursor: str | None = None) -> PrefixPage:
        return self._do(calls.list_page(limit, cursor))

    def iter_prefixes(self, page_size: int = 100) -> Iterator[PrefixInfo]:
        """Every prefix, following `next_cursor` page by page."""
        page = self.list(page_size)
        yield from page.items
        while page.next_cursor is not None:
            page = self.list(page_size, page.next_cursor)
            yield from page.items

    def get(self, task_id: str) -> PrefixInfo:
        return self._do(calls.get(task_id))

    def delete(self, task_id: str) -> None:
        self._do(calls.delete(task_id))

    def warm(self, task_id: str) -> PrefixInfo:
        """Prefetch into the server's caches; `tiers` of the result says where it now is."""
        return self._do(calls.warm(task_id))

    def create_key(
        self, name: str, scopes: Sequence[str], requests_per_second: float = 0, tokens_per_minute: int = 0
    ) -> CreatedKey:
        """A new tenant API key for `scopes` (task ids or `prefix*` patterns; 0 = unlimited rate).
        Its secret, `CreatedKey.key`, is in this answer only. The first key ends the server's
        open development mode for good."""
        return self._do(calls.create_key(name, scopes, requests_per_second, tokens_per_minute))

    def list_keys(self) -> builtins.list[KeyInfo]:
        return self._do(calls.LIST_KEYS)

    def revoke_key(self, key_id: str) -> KeyInfo:
        """Revoke a key (refused from the next request on); returns what it was."""
        return self._do(calls.revoke_key(key_id))

    def drain(self, grace_s: float | None = None) -> DrainState:
        """Take this replica out of rotation for maintenance: `/ready` fails (a proxy stops
        sending work), running requests finish, and after `grace_s` (server default 3 s: the
        time a proxy's health checks take to notice) new generations get a retry-safe 503; poll
        `drain_state()` until `drained`. Use the replica's own URL, not the proxy's."""
        return self._do(calls.drain(grace_s))

    def undrain(self) -> DrainState:
        """Back into rotation after `drain()` (409 `shutting_down` after a SIGTERM)."""
        return self._do(calls.UNDRAIN)

    def drain_state(self) -> DrainState:
        return self._do(calls.DRAIN_STATE)

    def generate(
        self,
        task_id: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        **sampling: Unpack[Sampling],
    ) -> Generation:
        """Send exactly one of `prompt` (text) or `input_ids`."""
        return self._do(calls.generate(task_id, prompt, input_ids, sampling))

    def stream(
        self,
        task_id: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        **sampling: Unpack[Sampling],
    ) -> Iterator[StreamEvent]:
        """Events as the server sends them; the request is made on the first `next()`."""
        return self._events(calls.stream(task_id, prompt, input_ids, sampling))

    def chat(
        self, task_id: str, messages: Sequence[Message], **sampling: Unpack[ChatSampling]
    ) -> ChatCompletion:
        """The assistant's answer to `messages`, rendered by the model's chat template, with
        `task_id`'s prefix (`POST /v1/chat/completions`, `model` = task id)."""
        return self._do(calls.chat(task_id, messages, sampling))

    def chat_stream(
        self, task_id: str, messages: Sequence[Message], **sampling: Unpack[ChatSampling]
    ) -> Iterator[ChatChunk]:
        """`chat` as it is generated: content pieces, then `finish_reason`, then `usage`."""
        return self._events(calls.chat_stream(task_id, messages, sampling))

    def health(self) -> dict[str, Any]:
        return self._do(calls.HEALTH)

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
