"""SIGTERM drains: new generations get 503 and `/ready` says draining while running ones finish;
past `--drain-seconds` the rest end with 500 `interrupted` (not 503: a proxy retries 503s); the
embedded Redis is flushed; `--request-timeout` cuts a generation off with 504 and frees its row."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server_process import ServerProcess, metric_value, upload_adapter
from tests.tiny_models import Adapter, save_adapter, save_tiny_model

LONG = 1000  # tokens: seconds of work for the tiny model on this CPU


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Adapter]:
    root = tmp_path_factory.mktemp("long")
    model_dir = save_tiny_model("gpt2", root / "model", max_positions=4096)
    return model_dir, save_adapter(model_dir, root / "adapter", num_virtual_tokens=4, seed=0)


def _body(max_new_tokens: int, stream: bool = False) -> dict[str, object]:
    return {"task_id": "t:long", "input_ids": [5, 6], "max_new_tokens": max_new_tokens, "ignore_eos": True,
            "stream": stream}  # fmt: skip


def _stream_events(url: str, body: dict[str, object], first: threading.Event, events: list[object]) -> None:
    with httpx.stream("POST", url + "/generate", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                first.set()


def test_sigterm_drains_running_requests_refuses_new_ones_and_flushes_redis(
    long_model: tuple[Path, Adapter], tmp_path: Path
) -> None:
    model_dir, adapter = long_model
    data_dir = tmp_path / "data"  # embedded Redis under it
    server = ServerProcess(data_dir, "--model", str(model_dir), "--max-new-tokens", str(LONG)).start()
    try:
        with httpx.Client(timeout=30) as client:
            assert (
                upload_adapter(client, server, "t:long", adapter.weights, adapter.config).status_code == 201
            )
        events: list[object] = []
        first = threading.Event()
        reader = threading.Thread(target=_stream_events, args=(server.url, _body(LONG, True), first, events))
        reader.start()
        assert first.wait(30)
        server.terminate()
        deadline = time.monotonic() + 5
        while httpx.get(server.url + "/ready").status_code == 200:
            assert time.monotonic() < deadline
        ready = httpx.get(server.url + "/ready")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        refused = httpx.post(server.url + "/generate", json=_body(2), timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["x-prefix-retry-safe"] == "1"  # no work done: a proxy retries it
        assert httpx.delete(server.url + "/admin/drain", headers=server.admin_headers).status_code == 409
        assert not [e for e in events if e == "[DONE]"], "the long request ended before the checks"
        reader.join(120)
        assert server.wait(60) is not None
    finally:
        server.stop()
    final = events[-2]
    assert events[-1] == "[DONE]" and isinstance(final, dict) and final["finish_reason"] == "length"
    assert sum(len(e["token_ids"]) for e in events[:-1] if isinstance(e, dict)) == LONG
    assert "Redis is now ready to exit" in (data_dir / "redis" / "redis.log").read_text()
    with ServerProcess(data_dir, "--model", str(model_dir)) as again:  # the acknowledged upload is on disk
        assert httpx.get(again.url + "/admin/prefixes/t:long", headers=again.admin_headers).status_code == 200


def test_past_drain_seconds_the_rest_end_with_500_interrupted_and_the_server_exits(
    long_model: tuple[Path, Adapter], tmp_path: Path
) -> None:
    model_dir, adapter = long_model
    flags = ["--model", str(model_dir), "--max-new-tokens", "4000", "--drain-seconds", "0.5"]
    server = ServerProcess(tmp_path / "data", *flags).start()
    try:
        with httpx.Client(timeout=30) as client:
            assert (
                upload_adapter(client, server, "t:long", adapter.weights, adapter.config).status_code == 201
            )
        answer: list[httpx.Response] = []
        worker = threading.Thread(
            target=lambda: answer.append(httpx.post(server.url + "/generate", json=_body(4000), timeout=120))
        )
        worker.start()
        while not metric_value(httpx.get(server.url + "/metrics").text, "prefix_server_running_requests"):
            time.sleep(0.02)
        terminated = time.monotonic()
        server.terminate()
        worker.join(60)
        assert server.wait(30) is not None
        elapsed = time.monotonic() - terminated
    finally:
        server.stop()
    assert answer[0].status_code == 500 and answer[0].json()["error"]["code"] == "interrupted"
    assert "X-Prefix-Retry-Safe" not in answer[0].headers  # work was done: no proxy may run it again
    assert elapsed < 15, f"took {elapsed:.1f} s to exit with --drain-seconds 0.5"


def test_request_timeout_answers_504_and_frees_the_row(
    long_model: tuple[Path, Adapter], tmp_path: Path
) -> None:
    model_dir, adapter = long_model
    flags = ["--model", str(model_dir), "--max-new-tokens", "4000", "--request-timeout", "0.3"]
    with ServerProcess(tmp_path / "data", *flags) as server, httpx.Client(timeout=60) as client:
        assert upload_adapter(client, server, "t:long", adapter.weights, adapter.config).status_code == 201
        response = client.post(server.url + "/generate", json=_body(4000))
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        with client.stream("POST", server.url + "/generate", json=_body(4000, True)) as stream:
            events = [json.loads(x[6:]) for x in stream.iter_lines() if x.startswith("data: {")]
        assert events[-1]["finish_reason"] == "timeout" and events[-1]["error"]["code"] == "timeout"
        v1 = client.post(
            server.url + "/v1/completions",
            json={"model": "t:long", "prompt": [5], "max_tokens": 4000, "ignore_eos": True},  # no early EOS
        )
        assert v1.status_code == 504
        metrics = client.get(server.url + "/metrics").text
        assert metric_value(metrics, "prefix_server_running_requests") == 0
        assert 'reason="timeout"' in metrics
        assert client.post(server.url + "/generate", json=_body(3)).status_code == 200  # the row was freed
