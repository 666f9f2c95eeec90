"""Responses the client stops reading are dropped: a slow or hostile reader never holds a row,
nor makes its request's outputs pile up in memory, for longer than `--stream-stall-timeout`."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class _Stalled(Exception):
    pass


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its body generator however the response ends. A failed
    `send` (a dropped stall) leaves the generator suspended at its `yield`, so its `finally`
    (abort the request, free the row) would wait for the garbage collector."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class StreamStallMiddleware:
    """When one `send` of a response stays blocked (TCP backpressure: the client does not read)
    for `stall_s`, the response is abandoned: the route's generator is closed, which aborts its
    engine request and frees the row, and the server closes the connection."""

    def __init__(self, app: ASGIApp, stall_s: float, log_interval_s: float = 10.0) -> None:
        self.app = app
        self.stall_s = stall_s
        self.num_dropped = 0
        self._log_interval_s = log_interval_s
        self._last_log = -float("inf")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def guarded_send(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), self.stall_s)
            except TimeoutError:
                raise _Stalled from None

        try:
            await self.app(scope, receive, guarded_send)
        except _Stalled:
            self._note_dropped(scope)

    def _note_dropped(self, scope: Scope) -> None:
        self.num_dropped += 1
        now = time.monotonic()
        if now - self._last_log >= self._log_interval_s:  # a bounded log, whatever the attack rate
            self._last_log = now
            log.warning(
                "dropped a response to %s unread for %.0f s (%d dropped so far)",
                scope.get("path", "?"),
                self.stall_s,
                self.num_dropped,
            )
