"""What `/generate` and `/v1/completions` share: resolve, pin, submit, collect, watch the client."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from prefix_store.entry import PrefixEntry
from server.api.deps import RequestHandleProtocol, Services
from server.api.errors import ApiError
from server.engine.request import SamplingParams, StepOutput

T = TypeVar("T")


@dataclass(frozen=True)
class Started:
    """A submitted generation: the prefix version it runs on, its prompt, its output stream."""

    prefix: PrefixEntry
    prompt_ids: list[int]
    handle: RequestHandleProtocol
    arrival: float
    summary: dict[str, object] = field(default_factory=dict)  # filled as it runs; logged per request

    def describe(self, task_id: str) -> dict[str, object]:
        """The access-log fields of this generation (the dict keeps filling in until it ends)."""
        self.summary.update(
            id=self.handle.request_id,
            task_id=task_id,
            prefix_version=self.prefix.meta.version,
            prompt_tokens=len(self.prompt_ids),
        )
        return self.summary


def check_limits(services: Services, params: SamplingParams) -> None:
    """Server limits on a request, checked before anything is loaded or computed."""
    if params.max_new_tokens > services.max_new_tokens:
        raise ApiError(422, "invalid_request", f"max_new_tokens must be <= {services.max_new_tokens}")


async def resolve_prefix(services: Services, task_id: str) -> PrefixEntry:
    prefix = await services.prefixes.get(task_id)
    if prefix is None:
        raise ApiError(404, "unknown_task", f"no prefix is uploaded for task_id {task_id!r}")
    return prefix


def start(
    services: Services,
    task_id: str,
    prefix: PrefixEntry,
    prompt_ids: list[int],
    params: SamplingParams,
    arrival: float,
) -> Started:
    """Submit to the engine; the task stays pinned in the prefix cache until the request is over."""
    prefixes = services.prefixes
    prefixes.pin(task_id)
    try:
        handle = services.engine.submit(prefix, prompt_ids, params, on_done=lambda: prefixes.unpin(task_id))
    except BaseException:
        prefixes.unpin(task_id)
        raise
    return Started(prefix, prompt_ids, handle, arrival)


async def outputs_of(started: Started, services: Services) -> AsyncIterator[StepOutput]:
    """The request's outputs as the engine makes them; records time to first token."""
    summary = started.summary
    summary["completion_tokens"] = 0
    async for output in started.handle:
        if "ttft_ms" not in summary:
            ttft = time.monotonic() - started.arrival
            services.metrics.ttft.observe(ttft)
            summary["ttft_ms"] = round(1000 * ttft, 2)
        summary["completion_tokens"] = int(summary["completion_tokens"]) + len(output.token_ids)  # type: ignore[call-overload]
        if output.finish_reason is not None:
            summary["finish_reason"] = output.finish_reason
        yield output


async def collect(started: Started, services: Services) -> list[StepOutput]:
    """All outputs of a request."""
    return [output async for output in outputs_of(started, services)]


def check_finished(outputs: list[StepOutput]) -> StepOutput:
    """The last output, which must be a normal finish."""
    last = outputs[-1]
    if last.error is not None or last.finish_reason not in ("length", "stop", "eos"):
        raise ApiError(500, "internal", last.error or f"generation ended: {last.finish_reason}")
    return last


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its rows) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not task.done():
            if await request.is_disconnected():
                task.cancel()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()
