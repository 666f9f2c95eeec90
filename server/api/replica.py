"""`X-Replica` on every response, so that routing behind a proxy is observable."""

from __future__ import annotations

import socket

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def default_replica_id(port: int) -> str:
    """`<hostname>:<port>`: unique per replica on one box and across pods."""
    return f"{socket.gethostname()}:{port}"


class ReplicaHeaderMiddleware:
    """Adds `X-Replica: <replica_id>` to every HTTP response (errors and streams included).

    Pure ASGI (not BaseHTTPMiddleware): it touches only the `http.response.start` message, so
    streamed bodies pass through untouched and unbuffered."""

    def __init__(self, app: ASGIApp, replica_id: str | None, port: int) -> None:
        self.app = app
        self.replica_id = replica_id or default_replica_id(port)
        # latin-1 is what HTTP headers carry; an unencodable id fails at start-up, not per request
        self._header = (b"x-replica", self.replica_id.encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self._header]
            await send(message)

        await self.app(scope, receive, send_with_replica)
