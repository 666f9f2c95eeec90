"""`X-Replica` on every response: the app's own answers (errors included) and streams."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from server.api.replica import ReplicaHeaderMiddleware
from server.app import create_app
from server.config import Settings


def test_the_app_names_its_replica_on_errors_too() -> None:
    # no `with`: the lifespan (model, Redis) never runs; routing and middleware still answer
    client = TestClient(create_app(Settings(replica_id="replica-7")))
    response = client.get("/no-such-path")
    assert response.status_code == 404 and response.headers["x-replica"] == "replica-7"


def test_the_default_is_hostname_and_port() -> None:
    client = TestClient(create_app(Settings(port=8123)))
    assert client.get("/no-such-path").headers["x-replica"] == f"{socket.gethostname()}:8123"


def test_a_stream_keeps_its_chunks_and_gets_the_header() -> None:
    async def events() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"data: {i}\n\n".encode()

    async def stream(request: object) -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream", headers={"x-other": "1"})

    app = ReplicaHeaderMiddleware(Starlette(routes=[Route("/s", stream)]), replica_id="r", port=1)
    with TestClient(app).stream("GET", "/s") as response:
        chunks = list(response.iter_bytes())
        assert response.headers["x-replica"] == "r" and response.headers["x-other"] == "1"
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
