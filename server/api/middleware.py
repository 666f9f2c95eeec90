"""Per request: metrics by route template and status, and one access-log line."""

import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.deps import Services
from server.logs import ACCESS_LOGGER

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

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            duration = time.perf_counter() - started
            services: Services | None = getattr(self.app_state, "services", None)
            endpoint = getattr(scope.get("route"), "path", "unmatched")  # the template: bounded labels
            if services is not None:
                services.metrics.observe_request(endpoint, status, duration)
            _log_access(scope, endpoint, status, duration)


def _log_access(scope: Scope, endpoint: str, status: int, duration: float) -> None:
    """One line per request; generations add their id, task, tokens and time to first token."""
    if endpoint in ("/metrics", "/health", "/ready"):  # scraped every few seconds: not worth a line each
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
