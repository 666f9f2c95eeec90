"""Authentication before the body: who may send `/generate`, `/v1/*` and `/admin/*` a body is
decided from the request headers alone, before any byte of the body is read or parsed.

FastAPI reads and parses a route's body before it resolves the route's dependencies, so an
`authenticate` dependency alone would let anonymous clients make the server parse 1 MB bodies (or
hold a connection open while one trickles in). This gate answers 401/403 (503 while API keys
cannot be checked) right after the headers, with `Connection: close`: the rest of the body is
never read. Admitted callers are left in the request state for the routes' `authenticate`.
"""

from collections.abc import Sequence
from typing import Any

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.auth import check_admin
from server.api.callers import CALLER_STATE, TOKEN_HOLD_STATE, caller_for
from server.api.deps import Services
from server.api.errors import ApiError, error_response


def is_gated(path: str) -> bool:
    """Paths that need a credential (an API key once keys exist, or the admin token)."""
    return path == "/generate" or path.startswith(("/v1/", "/admin/"))


class AuthGateMiddleware:
    """Pure ASGI, inside the request metrics (which then count the refusals) and outside the body
    limit (an anonymous 10 MB body is a 401, not a 413)."""

    def __init__(self, app: ASGIApp, app_state: Any, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.app_state = app_state
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services: Services | None = getattr(self.app_state, "services", None)
        if scope["type"] != "http" or services is None or not is_gated(scope["path"]):
            await self.app(scope, receive, send)
            return
        authorization = Headers(scope=scope).get("authorization")
        try:
            if scope["path"].startswith("/admin/"):
                check_admin(services, authorization)
            else:
                caller = await caller_for(services, authorization)
                state = scope.setdefault("state", {})
                state[CALLER_STATE], state[TOKEN_HOLD_STATE] = caller, caller.hold
        except ApiError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _refuse(self, exc: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
        """The error, then the connection closes: the unread body never reaches the server."""
        _name_route(self.routes, scope)
        response = error_response(exc, scope["path"])
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _name_route(routes: Sequence[BaseRoute], scope: Scope) -> None:
    """Put the matching route in the scope, so that the refusal is counted under its template."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            scope["route"] = route
            return
