"""What routes depend on: protocols for the engine and the prefix cache, reached via app state.

Torch-free at run time (the HTTP layer never imports torch): the records that hold tensors are
only named in annotations here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Protocol

from fastapi import Depends, Request

from prefix_store.meta import PrefixMeta, ResidentPrefix, TierUsage
from server.api.lifecycle import Lifecycle
from server.engine.request import SamplingParams, StepOutput
from server.engine.stats import EngineStats
from server.metrics import Metrics
from server.tenancy.keys import KeyStore
from server.tenancy.rate_limit import RateLimiter

if TYPE_CHECKING:
    from prefix_store.entry import PrefixEntry


class RequestHandleProtocol(Protocol):
    @property
    def request_id(self) -> str: ...

    def __aiter__(self) -> AsyncIterator[StepOutput]: ...

    def cancel(self) -> None: ...


class EngineProtocol(Protocol):
    """The engine as the API sees it."""

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (a prompt's bound before tokenizing it)."""
        ...

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    async def encode_off_loop(
        self,
        prompts: Sequence[str | list[int]],
        messages: list[dict[str, str]] | None,
        add_special_tokens: bool,
    ) -> list[list[int]]: ...

    def has_room(self, num_requests: int, task_id: str, tenant: str | None = None) -> bool: ...

    def submit(
        self,
        prefix: PrefixEntry,
        prompt_ids: list[int],
        params: SamplingParams,
        on_done: Callable[[], None] | None = None,
        tenant: str | None = None,
    ) -> RequestHandleProtocol: ...

    def token_text(self, token_id: int) -> str: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...

    def stats(self) -> EngineStats: ...


class PrefixesProtocol(Protocol):
    """The prefix cache in front of the Redis store (host tier; the device tier is the KV pool)."""

    async def get(self, task_id: str) -> PrefixEntry | None: ...

    async def warm(self, task_id: str) -> PrefixEntry | None: ...

    def pin(self, task_id: str) -> None: ...

    def unpin(self, task_id: str) -> None: ...

    def resident(self) -> list[ResidentPrefix]: ...

    def usage(self) -> dict[str, TierUsage]: ...

    async def upload(
        self, task_id: str, weights: bytes | None, config_json: bytes | None, text: str | None = None
    ) -> PrefixMeta: ...

    async def delete(self, task_id: str) -> bool: ...

    async def get_meta(self, task_id: str) -> PrefixMeta | None: ...

    async def list(
        self, limit: int, cursor: str | None, prefix: str = ""
    ) -> tuple[list[PrefixMeta], str | None]: ...

    async def ping(self) -> bool: ...


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (each from its `--max-*` flag)."""

    max_new_tokens: int
    max_prompt_tokens: int | None
    max_stop_strings: int
    max_upload_bytes: int
    max_body_bytes: int
    max_prompts: int = 32  # prompts x n in one /v1/completions request
    max_prompt_chars: int = 1 << 20  # characters of prompt text (or chat messages) in one request


@dataclass(frozen=True)
class Services:
    """Everything the routes use, built once by `create_app`'s lifespan."""

    engine: EngineProtocol
    prefixes: PrefixesProtocol
    metrics: Metrics
    admin_token: str
    limits: RequestLimits
    keys: KeyStore
    limiter: RateLimiter
    lifecycle: Lifecycle


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
