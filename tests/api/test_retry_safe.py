"""`X-Prefix-Retry-Safe: 1` on exactly the 503s of generation routes that did no work."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message, Receive, Scope, Send

from server.api.retry_safe import RetrySafeMiddleware, is_generation_path


def _answer(status: int, generations: list[object]) -> object:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if generations:
            scope.setdefault("state", {})["generations"] = generations  # as generation.launch does
        await send({"type": "http.response.start", "status": status, "headers": [(b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def _headers(path: str, status: int, generations: list[object]) -> dict[bytes, bytes]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    scope: Scope = {"type": "http", "path": path, "method": "POST", "headers": []}
    asyncio.run(RetrySafeMiddleware(_answer(status, generations))(scope, receive, send))  # type: ignore[arg-type]
    return dict(sent[0]["headers"])


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_a_503_before_any_work_is_marked(path: str) -> None:
    assert _headers(path, 503, [])[b"x-prefix-retry-safe"] == b"1"


@pytest.mark.parametrize(
    ("path", "status", "generations"),
    [
        ("/generate", 503, [{"id": "r1"}]),  # work was submitted: never marked (and logged)
        ("/generate", 200, []),
        ("/generate", 429, []),
        ("/admin/prefixes/t", 503, []),  # not a proxied generation route
        ("/ready", 503, []),
        ("/v1/models", 503, []),
    ],
)
def test_everything_else_is_not_marked(path: str, status: int, generations: list[object]) -> None:
    assert b"x-prefix-retry-safe" not in _headers(path, status, generations)


def test_generation_paths_are_haproxys_by_task_routes() -> None:
    assert is_generation_path("/generate") and is_generation_path("/v1/chat/completions")
    assert not is_generation_path("/generate/x") and not is_generation_path("/v1/models")
