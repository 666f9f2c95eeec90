"""Which 503s a proxy may send to another replica: `X-Prefix-Retry-Safe: 1` on every 503 a
generation route answers before it submitted any work (draining, shutting down, the store or the
key store unreachable, the engine stopped, the connection cap).

HAProxy 2.6's `retry-on` matches a status, not a header, so the guarantee is the server's: on the
routes the proxy retries (`/generate`, `/v1/completions`, `/v1/chat/completions`), a 503 always
means "nothing was done". The one failure after work started, a generation cut short by a
shutdown, is 500 `interrupted` (see outputs._ENDINGS) and is never retried. A 503 there after
work started would be a bug: it is logged and left unmarked.
"""

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

RETRY_SAFE_HEADER = "X-Prefix-Retry-Safe"
GENERATION_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")  # HAProxy's by_task


def is_generation_path(path: str) -> bool:
    return path == "/generate" or path.startswith(GENERATION_PATHS[1:])


def has_started_work(scope: Scope) -> bool:
    """`generation.launch` records the generations it submitted in the request's state."""
    return bool((scope.get("state") or {}).get("generations"))


class RetrySafeMiddleware:
    """Marks a generation route's 503 retry-safe when the request submitted no generation."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_generation_path(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def marking_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                if has_started_work(scope):
                    log.error("a 503 after work started on %s: not marked retry-safe", scope["path"])
                else:
                    header = (RETRY_SAFE_HEADER.lower().encode(), b"1")
                    message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, marking_send)
