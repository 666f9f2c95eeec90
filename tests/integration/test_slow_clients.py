"""Slow and hostile HTTP clients: connections that never finish their headers are cut after
`--header-timeout`, connections beyond `--max-connections` get 503 at once, and a stream nobody
reads is dropped after `--stream-stall-timeout` with its row freed."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_process import ServerProcess, metric_value, upload_adapter
from tests.tiny_models import save_adapter, save_tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("slow")
    model_dir = save_tiny_model("gpt2", root / "model", max_positions=4096)
    adapter = save_adapter(model_dir, root / "adapter", num_virtual_tokens=4, seed=0)
    flags = ["--model", str(model_dir), "--header-timeout", "1", "--max-connections", "40"]
    flags += ["--stream-stall-timeout", "1", "--max-new-tokens", "4000"]
    with ServerProcess(root / "data", *flags) as running, httpx.Client(timeout=30) as client:
        weights = (adapter.path / "adapter_model.safetensors").read_bytes()
        config = (adapter.path / "adapter_config.json").read_bytes()
        assert upload_adapter(client, running, "t:slow", weights, config).status_code == 201
        yield running


def _half_request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")  # never ends
    return sock


def _is_closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def test_connections_that_never_finish_their_headers_are_cut(server: ServerProcess) -> None:
    attackers = [_half_request(server.port) for _ in range(30)]
    try:
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # others still served
        time.sleep(2.0)  # past --header-timeout (x 1.5 at most: jittered)
        assert all(_is_closed_by_server(sock) for sock in attackers)
    finally:
        for sock in attackers:
            sock.close()


def test_connections_beyond_the_cap_get_503_at_once(server: ServerProcess) -> None:
    attackers = [_half_request(server.port) for _ in range(40)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503"), answer
    finally:
        for sock in attackers:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def _running(server: ServerProcess) -> float:
    return metric_value(httpx.get(server.url + "/metrics", timeout=5).text, "prefix_server_running_requests")


def test_a_stream_nobody_reads_is_dropped_and_its_row_freed(server: ServerProcess, tmp_path: Path) -> None:
    # ~1 KB per event (5 alternatives each): megabytes in all, more than socket buffers hold
    body = json.dumps(
        {
            "model": "t:slow",
            "prompt": [5, 6],
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
            "logprobs": 5,
        }
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # a reader that takes nothing in
    sock.connect(("127.0.0.1", server.port))
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    try:
        deadline = time.monotonic() + 60
        while _running(server) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        while _running(server) > 0:  # 4000 tokens take far longer than the drop
            assert time.monotonic() < deadline, "the unread stream still holds its row"
            time.sleep(0.2)
        sock.settimeout(10)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        assert b"[DONE]" not in received  # cut off, not finished
    finally:
        sock.close()
    assert "dropped a response to /v1/completions" in server.log_tail(20000)
