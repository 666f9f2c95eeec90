"""Responses the client stops reading are dropped: a slow or hostile reader never holds a row,
nor makes its request's outputs pile up in memory, for longer than `--stream-stall-timeout`."""

from __future__ import annotations

import asyncio
import logging

from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http_guard import RateLimitedRecords

log = logging.getLogger(__name__)
log.addFilter(RateLimitedRecords(("dropped a response",)))  # a bounded log, whatever the attack rate


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

    def __init__(self, app: ASGIApp, stall_s: float) -> None:
        self.app = app
        self.stall_s = stall_s

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
            log.warning("dropped a response to %s unread for %.0f s", scope.get("path", "?"), self.stall_s)
