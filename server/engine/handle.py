"""The caller's side of one engine request."""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from server.engine.request import Request, StepOutput

# A reader this many outputs behind pauses its row (no compute, no memory growth for a client
# that stopped reading); the row resumes once the reader is back within RESUME_AT.
PAUSE_AT = 64
RESUME_AT = 16


class _Releaser(Protocol):
    def release(self, handle: "RequestHandle") -> None: ...

    def resume(self, handle: "RequestHandle") -> None: ...


class RequestHandle:
    """The caller's side of one request: iterate its outputs; closing early aborts it."""

    def __init__(self, engine: _Releaser, request: Request, on_done: Callable[[], None] | None) -> None:
        self.request = request
        self._engine = engine
        self._queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._on_done = on_done
        self.is_paused = False

    @property
    def num_unread(self) -> int:
        return self._queue.qsize()

    def _done(self) -> None:
        """Runs once, on the event loop, when the request ended or its caller left."""
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def cancel(self) -> None:
        """Stop the request (if it is still going) without reading its outputs."""
        self._engine.release(self)

    def _deliver(self, output: StepOutput) -> None:
        self._queue.put_nowait(output)

    async def __aiter__(self) -> AsyncIterator[StepOutput]:
        try:
            while True:
                output = await self._queue.get()
                if self.is_paused and self._queue.qsize() <= RESUME_AT:
                    self._engine.resume(self)
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            self._engine.release(self)
