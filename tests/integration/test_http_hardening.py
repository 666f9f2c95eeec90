"""Issue 25, attacks 1, 2 and 10, against a real server over raw sockets: credentials are checked
from the headers before any body byte is read, every request must arrive in time (headers, then
body at a minimum rate), connections are capped per client (by `X-Forwarded-For` only from a
trusted proxy) with a reserve for probes, `/metrics` and the docs are closed, ids are random."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import Adapter

HEADER_TIMEOUT_S = 2.0  # x 1 to 1.5, jittered
PER_CLIENT = 4
MAX_CONNECTIONS = 8
PROXY = "127.0.0.1"  # trusted; other loopback addresses (127.0.0.2, ...) are direct clients


@pytest.fixture(scope="module")
def served(
    gpt2_dir: Path, adapter: Adapter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, str]]:
    """A server with one API key (so anonymous callers are refused) and task `t:good`."""
    flags = ["--model", str(gpt2_dir), "--header-timeout", str(HEADER_TIMEOUT_S), "--min-body-rate", "2000"]
    flags += ["--max-connections", str(MAX_CONNECTIONS), "--max-connections-per-client", str(PER_CLIENT)]
    flags += ["--forwarded-allow-ips", PROXY]
    with (
        ServerProcess(tmp_path_factory.mktemp("http") / "data", *flags) as server,
        httpx.Client(timeout=30) as client,
    ):
        assert upload_adapter(client, server, "t:good", adapter.weights, adapter.config).status_code == 201
        created = client.post(
            server.url + "/admin/keys", json={"name": "k", "scopes": ["t:*"]}, headers=server.admin_headers
        )
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        deadline = time.monotonic() + 5
        while client.post(server.url + "/generate", json={"task_id": "t:good"}).status_code != 401:
            assert time.monotonic() < deadline, "the server did not notice the first key"
            time.sleep(0.1)
        yield server, key


def _connect(server: ServerProcess, source: str = PROXY) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    return sock


def _head(path: str, content_length: int, *extra: str, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    lines += [f"Content-Length: {content_length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (raises on the socket timeout)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _trickle(sock: socket.socket, num_bytes: int, interval_s: float) -> int:
    """Send body bytes one at a time until the server closes; how many went out."""
    for num_sent in range(num_bytes):
        try:
            sock.sendall(b"1")
        except (BrokenPipeError, ConnectionResetError):
            return num_sent
        time.sleep(interval_s)
    return num_bytes


@pytest.mark.parametrize(
    ("path", "auth", "status"),
    [
        ("/generate", None, 401),
        ("/generate", "Authorization: Bearer not-a-key", 401),
        ("/v1/completions", None, 401),
        ("/v1/chat/completions", "Authorization: Bearer not-a-key", 401),
        ("/admin/prefixes/t:x", None, 401),
        ("/admin/keys", "Authorization: Bearer not-the-admin", 403),
    ],
)
def test_a_refused_caller_is_answered_from_the_headers_and_its_body_never_read(
    served: tuple[ServerProcess, str], path: str, auth: str | None, status: int
) -> None:
    """Attack 2 (and 1 without credentials): a 1 MB body sent slowly is never consumed."""
    server, _ = served
    with _connect(server) as sock:
        sock.sendall(_head(path, 1_000_000, *([auth] if auth else [])) + b"[1.5e300,")
        start = time.monotonic()
        answer = _read_to_close(sock)
        elapsed = time.monotonic() - start
        assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:200]
        assert b"connection: close" in answer.lower()
        assert elapsed < 1.0, f"answered and closed after {elapsed:.2f} s"
        assert _trickle(sock, 1000, 0.01) < 1000  # the connection is gone: the body has nowhere to go


def test_an_admitted_body_must_keep_arriving(served: tuple[ServerProcess, str]) -> None:
    """A key holder's body trickling in at 10 bytes/s (under --min-body-rate) is cut off."""
    server, key = served
    with _connect(server) as sock:
        sock.sendall(_head("/generate", 10_000, f"Authorization: Bearer {key}"))
        start = time.monotonic()
        num_sent = _trickle(sock, 10_000, 0.1)
        elapsed = time.monotonic() - start
    assert num_sent < 100 and elapsed < 2 * HEADER_TIMEOUT_S + 2, (num_sent, elapsed)
    body = {"task_id": "t:good", "input_ids": [5, 6], "max_new_tokens": 2}
    answer = httpx.post(server.url + "/generate", json=body, headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200 and re.fullmatch(r"gen-[0-9a-f]{32}", answer.json()["id"])


def test_connections_are_capped_per_client_address(served: tuple[ServerProcess, str]) -> None:
    """Over its cap a client waits ~2 s for its 503 (a client retrying at once when refused would
    otherwise cost the loop thousands of accepts a second); waiting, it takes no one's place."""
    server, _ = served
    held = [_connect(server, "127.0.0.2") for _ in range(PER_CLIENT)]
    started = time.monotonic()  # before the extra connections: each waits >= 2 s from its connect
    extras = [_connect(server, "127.0.0.2") for _ in range(MAX_CONNECTIONS)]
    try:
        with _connect(server, "127.0.0.3") as other:  # served meanwhile, not as a probe (reserve)
            other.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert other.recv(4096).startswith(b"HTTP/1.1 401")  # answered: no key
        for extra in extras:
            assert _read_to_close(extra).startswith(b"HTTP/1.1 503")
        assert 2.0 <= time.monotonic() - started < 6.0
    finally:
        for sock in held + extras:
            sock.close()


def test_probes_have_a_reserve_when_every_connection_is_taken(served: tuple[ServerProcess, str]) -> None:
    server, _ = served
    held = [_connect(server, f"127.0.0.{2 + i % 2}") for i in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)
        for path in ("/health", "/ready"):
            with _connect(server, "127.0.0.9") as probe:
                probe.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert probe.recv(4096).startswith(b"HTTP/1.1 200"), path
        with _connect(server, "127.0.0.9") as other:
            other.sendall(_head("/generate", 2) + b"{}")
            assert _read_to_close(other).startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()


def test_forwarded_for_is_believed_from_the_trusted_proxy_only(served: tuple[ServerProcess, str]) -> None:
    """Behind the proxy, each real client gets PER_CLIENT requests in flight."""
    server, key = served
    auth = f"Authorization: Bearer {key}"
    held = [_connect(server, PROXY) for _ in range(PER_CLIENT)]
    try:
        for sock in held:  # in flight: waiting for the rest of its body
            sock.sendall(_head("/generate", 100, auth, "X-Forwarded-For: 10.1.1.1") + b"{")
        time.sleep(0.2)
        with _connect(server, PROXY) as extra:
            extra.sendall(_head("/v1/models", 0, auth, "X-Forwarded-For: 10.1.1.1", method="GET"))
            assert _read_to_close(extra).startswith(b"HTTP/1.1 429")
        for forwarded, source in (
            ("10.1.1.2", PROXY),
            ("10.1.1.1", "127.0.0.5"),
        ):  # another client; untrusted
            with _connect(server, source) as other:
                other.sendall(_head("/v1/models", 0, auth, f"X-Forwarded-For: {forwarded}", method="GET"))
                assert other.recv(4096).startswith(b"HTTP/1.1 200"), (forwarded, source)
    finally:
        for sock in held:
            sock.close()


def test_metrics_and_docs_are_closed(served: tuple[ServerProcess, str]) -> None:
    """Attack 10: API keys exist and no --metrics-token is set: /metrics answers nobody; no docs UI."""
    server, key = served
    for headers in ({}, {"Authorization": f"Bearer {key}"}, server.admin_headers):
        answer = httpx.get(server.url + "/metrics", headers=headers)
        assert answer.status_code == 403 and "--metrics-token" in answer.text
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 404


def test_a_client_still_sending_its_body_can_read_the_refusal(served: tuple[ServerProcess, str]) -> None:
    """The server half-closes and discards what still comes for a moment (lingering close):
    closing with unread bytes would make the kernel reset the connection, which can destroy the
    401 before the client reads it (the soak bench lost a few of these before)."""
    server, _ = served

    async def refused(client: httpx.AsyncClient) -> list[int]:
        statuses = []
        for _ in range(16):
            upload = await client.put("/admin/prefixes/t:x", files={"text": (None, b"x")})
            generate = await client.post("/generate", json={"task_id": "t:good", "input_ids": [5] * 3000})
            statuses += [upload.status_code, generate.status_code]
        return statuses

    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            return await asyncio.gather(*(refused(client) for _ in range(PER_CLIENT)))

    assert all(status == 401 for statuses in asyncio.run(run()) for status in statuses)
