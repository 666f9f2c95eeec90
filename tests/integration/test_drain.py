"""`POST /admin/drain` on one server: `/ready` 503, new generations a retry-safe 503 (no work
done), the running generation finishes, the process keeps running; `DELETE` brings it back."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import save_adapter, save_tiny_model

LONG = 1000  # tokens: seconds of work for the tiny model: it runs through the checks


def _body(max_new_tokens: int, **extra: object) -> dict[str, object]:
    return {
        "task_id": "t:d",
        "input_ids": [5, 6],
        "max_new_tokens": max_new_tokens,
        "ignore_eos": True,
        **extra,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    root = tmp_path_factory.mktemp("drain")
    model = save_tiny_model("gpt2", root / "model", max_positions=4096)
    adapter = save_adapter(model, root / "adapter", num_virtual_tokens=4, seed=0)
    server = ServerProcess(root / "data", "--model", str(model), "--max-new-tokens", str(LONG)).start()
    with httpx.Client(timeout=30) as client:
        assert upload_adapter(client, server, "t:d", adapter.weights, adapter.config).status_code == 201
    yield server  # type: ignore[misc]
    server.stop()


def _refused(response: httpx.Response) -> bool:
    return (
        response.status_code == 503
        and response.headers.get("retry-after") == "1"
        and response.headers.get("x-prefix-retry-safe") == "1"
        and "maintenance" in response.json()["error"]["message"]
    )


def test_drain_refuses_new_work_lets_running_work_finish_and_undrain_restores(server: ServerProcess) -> None:
    url, admin = server.url, server.admin_headers
    assert httpx.post(url + "/admin/drain").status_code == 401
    events: list[dict[str, object]] = []
    first = threading.Event()

    def stream() -> None:  # a generation running when the drain starts
        with httpx.stream("POST", url + "/generate", json=_body(LONG, stream=True), timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(30)
    state = httpx.post(url + "/admin/drain", params={"grace": 0}, headers=admin).json()
    assert state["draining"] and state["refusing"] and state["maintenance"] and not state["shutting_down"]
    assert state["requests_in_flight"] == 1 and not state["drained"], state  # the stream
    ready = httpx.get(url + "/ready")
    assert ready.status_code == 503 and ready.json()["draining"] is True
    assert _refused(httpx.post(url + "/generate", json=_body(4), timeout=30))
    assert _refused(httpx.post(url + "/generate", json=_body(4, stream=True), timeout=30))
    openai = httpx.post(url + "/v1/completions", json={"model": "t:d", "prompt": [5], "max_tokens": 2})
    assert openai.status_code == 503 and openai.headers["x-prefix-retry-safe"] == "1"
    assert httpx.get(url + "/admin/prefixes/t:d", headers=admin).status_code == 200  # admin still works
    assert not any(e.get("finish_reason") for e in events), "the stream ended before the checks"
    reader.join(60)
    assert events[-1]["finish_reason"] == "length"
    assert sum(len(e["token_ids"]) for e in events) == LONG  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while not (state := httpx.get(url + "/admin/drain", headers=admin).json())["drained"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    assert state["requests_in_flight"] == 0 and state["generations_running"] == 0
    assert httpx.post(url + "/admin/drain", headers=admin).json()["drained"]  # idempotent
    back = httpx.delete(url + "/admin/drain", headers=admin).json()
    assert not back["draining"] and not back["maintenance"]
    assert httpx.get(url + "/ready").status_code == 200
    answer = httpx.post(url + "/generate", json=_body(4), timeout=30)
    assert answer.status_code == 200 and "x-prefix-retry-safe" not in answer.headers


def test_prefixctl_drains_waits_and_undrains(server: ServerProcess) -> None:
    from typer.testing import CliRunner

    from clients.cli import app

    runner = CliRunner()
    flags = ["--url", server.url, "--token", server.admin_token]
    drained = runner.invoke(app, [*flags, "drain", "--grace", "0.5", "--wait", "--timeout", "10"])
    assert drained.exit_code == 0, drained.output
    assert json.loads(drained.output)["drained"] is True
    assert httpx.get(server.url + "/ready").status_code == 503
    undrained = runner.invoke(app, [*flags, "undrain"])
    assert undrained.exit_code == 0 and json.loads(undrained.output)["draining"] is False
    assert httpx.get(server.url + "/ready").status_code == 200


def test_during_the_grace_new_work_is_served_while_ready_already_fails(server: ServerProcess) -> None:
    """The grace is for a proxy's health checks to notice: what it still sends is served."""
    url, admin = server.url, server.admin_headers
    state = httpx.post(url + "/admin/drain", params={"grace": 1.5}, headers=admin).json()
    started = time.monotonic()
    try:
        assert state["draining"] and not state["refusing"] and not state["drained"], state
        assert httpx.get(url + "/ready").status_code == 503
        assert httpx.post(url + "/generate", json=_body(4), timeout=30).status_code == 200
        assert time.monotonic() - started < 1.5, "too slow to check the grace"
        time.sleep(1.6 - (time.monotonic() - started))
        assert _refused(httpx.post(url + "/generate", json=_body(4), timeout=30))
        assert httpx.get(url + "/admin/drain", headers=admin).json()["drained"] is True
    finally:
        httpx.delete(url + "/admin/drain", headers=admin)
    assert httpx.post(url + "/generate", json=_body(4), timeout=30).status_code == 200
