"""A real Prometheus scrapes a server under traffic: every dashboard expression returns data."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.prometheus_process import ROOT, PrometheusProcess, find_binary
from tests.redis_server import RedisProcess
from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import Adapter

pytestmark = pytest.mark.skipif(
    find_binary("prometheus") is None,
    reason="no prometheus binary: `make prometheus` could not `apt-get download prometheus` here",
)


def _dashboard_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", ROOT / "docker/grafana/build_dashboard.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _traffic(server: ServerProcess, stop: threading.Event) -> None:
    """Generations of two tasks (plain, streamed, OpenAI), a cold load, and some errors."""
    with httpx.Client(timeout=30) as client:
        i = 0
        while not stop.is_set():
            task = f"t:{i % 2}"
            client.post(
                server.url + "/generate", json={"task_id": task, "input_ids": [5, 6], "max_new_tokens": 8}
            )
            client.post(
                server.url + "/v1/completions",
                json={"model": task, "prompt": "hi", "max_tokens": 4, "stream": True},
            )
            client.post(server.url + "/generate", json={"task_id": "t:missing", "input_ids": [5]})  # 404
            client.post(server.url + "/generate", json={"task_id": task, "input_ids": []})  # 422
            if i % 5 == 0:
                client.post(server.url + f"/admin/prefixes/{task}/warm", headers=server.admin_headers)
            i += 1
            time.sleep(0.05)


def test_every_dashboard_expression_returns_data(gpt2_dir: Path, adapter: Adapter, tmp_path: Path) -> None:
    module = _dashboard_module()
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/prefix-server.json").read_text())
    assert dashboard == module.render(), (
        "dashboard JSON is stale: run python docker/grafana/build_dashboard.py"
    )
    expressions = module.expressions(dashboard)
    with RedisProcess() as redis_proc:
        flags = ["--model", str(gpt2_dir), "--redis-url", redis_proc.url]
        with ServerProcess(tmp_path / "data", *flags) as server, httpx.Client(timeout=30) as client:
            for task in ("t:0", "t:1"):
                assert (
                    upload_adapter(client, server, task, adapter.weights, adapter.config).status_code == 201
                )
            stop = threading.Event()
            worker = threading.Thread(target=_traffic, args=(server, stop), daemon=True)
            worker.start()
            try:
                with PrometheusProcess(tmp_path, [f"127.0.0.1:{server.port}"]) as prometheus:
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:  # rate() needs a few scrapes
                        samples = prometheus.query('count_over_time(up{job="prefix-server"}[1m])')
                        if samples and float(samples[0]["value"][1]) >= 5:
                            break
                        time.sleep(0.5)
                    assert prometheus.query('up{job="prefix-server"}')[0]["value"][1] == "1"
                    empty = [
                        e for e in expressions if not prometheus.query(e.replace("$__rate_interval", "1m"))
                    ]
            finally:
                stop.set()
                worker.join(timeout=30)
    assert empty == [], f"{len(empty)} of {len(expressions)} dashboard expressions returned no data"
