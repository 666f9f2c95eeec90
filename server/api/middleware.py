"""Per request: metrics by route template and status, one access-log line, in-flight count, the
release of tokens held at admission; body limits."""

import logging
import time
import uuid
from typing import Any

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.callers import release_hold
from server.api.deps import Services
from server.api.errors import ApiError, error_response
from server.api.lifecycle import Lifecycle
from server.logs import ACCESS_LOGGER

# scraped every few seconds (/admin/drain: polled until drained, logs its own changes): no
# access-log line, not "in flight"
_PROBES = ("/metrics", "/health", "/ready", "/admin/drain")

access_log = logging.getLogger(ACCESS_LOGGER)


class RequestMetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so client disconnects stay visible to the routes."""

    def __init__(self, app: ASGIApp, app_state: Any) -> None:
        self.app = app
        self.app_state = app_state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        lifecycle: Lifecycle | None = getattr(self.app_state, "lifecycle", None)
        if scope["path"] in _PROBES:
            lifecycle = None  # a probe never holds up a drain
        if lifecycle is not None:
            lifecycle.num_in_flight += 1

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            if lifecycle is not None:
                lifecycle.num_in_flight -= 1
            duration = time.perf_counter() - started
            services: Services | None = getattr(self.app_state, "services", None)
            endpoint = getattr(scope.get("route"), "path", "unmatched")  # the template: bounded labels
            if services is not None:
                services.metrics.observe_request(endpoint, status, duration)
                release_hold(services, scope.get("state") or {})  # however the request ended
            _log_access(scope, endpoint, status, duration)


def _log_access(scope: Scope, endpoint: str, status: int, duration: float) -> None:
    """One line per request; generations add their id, task, tokens and time to first token."""
    if endpoint in _PROBES:
        return
    fields: dict[str, object] = {
        "method": scope.get("method"),
        "path": scope.get("path"),
        "status": status,
        "duration_ms": round(1000 * duration, 2),
    }
    generations = (scope.get("state") or {}).get("generations") or []
    if len(generations) == 1:
        fields.update(generations[0])
    elif generations:
        fields["generations"] = generations
    fields.setdefault("id", f"req-{uuid.uuid4().hex[:12]}")
    access_log.info("request", extra={"fields": fields})


class BodyLimitMiddleware:
    """413 for a body over `max_body_bytes` (prefix uploads: `max_upload_bytes` plus form overhead),
    whether its size is announced (`Content-Length`) or found while it streams in."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes + 1024 * 1024

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["path"].startswith("/admin/prefixes/")
        limit = self.max_upload_bytes if is_upload else self.max_body_bytes
        message = f"the request body is larger than the {limit} bytes allowed"
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = error_response(ApiError(413, "too_large", message), scope["path"])
            await response(scope, receive, send)
            return
        num_received = 0

        async def limited_receive() -> Message:
            nonlocal num_received
            received = await receive()
            num_received += len(received.get("body", b""))
            if num_received > limit:
                raise HTTPException(413, message)
            return received

        await self.app(scope, limited_receive, send)
