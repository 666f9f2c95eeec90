"""Requests in flight per client, for clients behind a trusted proxy.

A direct client is capped per connection (`server.http_conn`). A proxy in `--forwarded-allow-ips`
carries many clients over its connections, so those count only towards `--max-connections`;
uvicorn puts the real client (`X-Forwarded-For`, trusted from those peers only) in the scope, and
this middleware caps each such client's requests in flight at `--max-connections-per-client`
(with HTTP/1.1, a direct client's requests in flight never exceed its connections, so the same
count caps both). Probes are not counted."""

from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import ApiError, error_response

_PROBES = ("/health", "/ready", "/metrics")


class ClientCapMiddleware:
    def __init__(self, app: ASGIApp, max_per_client: int) -> None:
        self.app = app
        self.max_per_client = max_per_client
        self.num_in_flight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not client or scope["path"] in _PROBES:
            await self.app(scope, receive, send)
            return
        host = str(client[0])
        if self.num_in_flight[host] >= self.max_per_client:
            error = ApiError(
                429,
                "overloaded",
                f"this client has {self.max_per_client} requests in flight "
                "(--max-connections-per-client); try again",
                {"Retry-After": "1", "Connection": "close"},
            )
            await error_response(error, scope["path"])(scope, receive, send)
            return
        self.num_in_flight[host] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.num_in_flight[host] -= 1
            if self.num_in_flight[host] <= 0:
                del self.num_in_flight[host]
