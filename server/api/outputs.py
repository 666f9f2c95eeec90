"""A started generation's outputs as the engine makes them: read one by one (`outputs_of`,
with time to first token and the caller's charge), all at once (`collect`), several interleaved
(`interleave`), or until the client leaves (`until_disconnect`); and the errors that a failed
ending stands for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from fastapi import Request

from server.api.background import in_background
from server.api.deps import Services
from server.api.errors import ApiError
from server.api.generation import Started
from server.engine.request import StepOutput

T = TypeVar("T")


async def outputs_of(started: Started, services: Services) -> AsyncIterator[StepOutput]:
    """The request's outputs as the engine makes them; records time to first token; charges the
    caller's key for what was generated, however the request ends."""
    summary = started.summary
    summary["completion_tokens"] = num_tokens = 0
    try:
        async for output in started.handle:
            if "ttft_ms" not in summary:
                ttft = time.monotonic() - started.arrival
                services.metrics.ttft.observe(ttft)
                summary["ttft_ms"] = round(1000 * ttft, 2)
            num_tokens += len(output.token_ids)
            summary["completion_tokens"] = num_tokens
            if output.finish_reason is not None:
                summary["finish_reason"] = output.finish_reason
            yield output
    finally:
        key = started.caller.key
        if key is not None and num_tokens:
            in_background(services.limiter.charge(key, num_tokens))


async def collect(started: Started, services: Services) -> list[StepOutput]:
    """All outputs of a request."""
    return [output async for output in outputs_of(started, services)]


_ENDINGS = {  # finish reasons that are failures: status, code, headers
    "timeout": (504, "timeout", {}),
    # not 503: a proxy retries 503s on another replica (prefix_cluster/haproxy.cfg), and this one
    # came after work was done; running it again would run (and bill) it twice
    "shutdown": (500, "interrupted", {"Retry-After": "1"}),
    "shed": (429, "overloaded", {"Retry-After": "1"}),
}


def ended_error(output: StepOutput) -> ApiError | None:
    """The error an output stands for; None for tokens and for a normal finish (length, stop, eos)."""
    if output.error is None and output.finish_reason in (None, "length", "stop", "eos"):
        return None
    status, code, headers = _ENDINGS.get(output.finish_reason or "", (500, "internal", {}))
    return ApiError(status, code, output.error or f"generation ended: {output.finish_reason}", headers)


def check_finished(outputs: list[StepOutput]) -> StepOutput:
    """The last output, which must be a normal finish."""
    last = outputs[-1]
    error = ended_error(last)
    if error is not None:
        raise error
    return last


CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its rows) if the client goes away first; that
    ends the request with 499 (metrics and access log), not a server error."""
    task = asyncio.ensure_future(work)
    is_client_gone = False

    async def watch() -> None:
        nonlocal is_client_gone
        while not task.done():
            if await request.is_disconnected():
                is_client_gone = True
                task.cancel()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not is_client_gone:
            raise  # the server is cancelling this request itself
        raise ApiError(CLIENT_CLOSED, "client_closed", "the client closed the connection") from None
    finally:
        watcher.cancel()


async def interleave(started: Sequence[Started], services: Services) -> AsyncIterator[tuple[int, StepOutput]]:
    """Outputs of several generations as they come, each with its index in `started`. Closing
    the iterator early (the client left) aborts every generation still going."""
    queue: asyncio.Queue[tuple[int, StepOutput | None]] = asyncio.Queue()
    # Pumps wait while this many outputs are unread: a client that stops reading leaves the
    # outputs in the handles, whose rows then pause (see engine.handle.PAUSE_AT).
    room = asyncio.Semaphore(2 * len(started))

    async def pump(index: int, one: Started) -> None:
        try:
            async for output in outputs_of(one, services):
                await room.acquire()
                queue.put_nowait((index, output))
        finally:
            queue.put_nowait((index, None))

    pumps = [asyncio.ensure_future(pump(i, one)) for i, one in enumerate(started)]
    try:
        remaining = len(started)
        while remaining:
            index, output = await queue.get()
            if output is None:
                remaining -= 1
                continue
            room.release()
            yield index, output
    finally:
        for task in pumps:
            task.cancel()
