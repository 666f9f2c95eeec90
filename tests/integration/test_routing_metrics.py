"""Routing metrics on a real server: the vLLM names the Gateway API Inference Extension's
endpoint picker scrapes appear with `--metrics-vllm-names` only, bounded and private."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_process import ServerProcess, metric_value, upload_adapter
from tests.tiny_models import Adapter

VLLM_GAUGES = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:gpu_cache_usage_perc",
    "vllm:kv_cache_usage_perc",
)
TASKS = ("acme:a", "acme:b")
METRICS_TOKEN = "routing-metrics-token"  # once API keys exist, /metrics needs one


@pytest.fixture(scope="module")
def servers(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """One server with the vLLM names (per-task ids bounded to 1), one without."""
    root = tmp_path_factory.mktemp("routing")
    flags = ["--model", str(gpt2_dir), "--metrics-max-tasks", "1", "--metrics-token", METRICS_TOKEN]
    with (
        ServerProcess(root / "on", *flags, "--metrics-vllm-names", "true") as on,
        ServerProcess(root / "off", *flags) as off,
    ):
        yield {"on": on, "off": off}


def _scrape(server: ServerProcess) -> str:
    response = httpx.get(
        server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10
    )
    assert response.status_code == 200
    return response.text


def _lora_labels(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(lines) == 1, lines
    return dict(re.findall(r'(\w+)="([^"]*)"', lines[0]))


def _serve_tasks(server: ServerProcess, adapter: Adapter) -> None:
    with httpx.Client(timeout=30) as client:
        for task_id in TASKS:
            assert upload_adapter(client, server, task_id, adapter.weights, adapter.config).is_success
            body = {"task_id": task_id, "input_ids": [5, 6, 7], "max_new_tokens": 2}
            assert client.post(server.url + "/generate", json=body).status_code == 200


def test_vllm_names_only_with_the_flag(servers: dict[str, ServerProcess]) -> None:
    on, off = _scrape(servers["on"]), _scrape(servers["off"])
    for name in VLLM_GAUGES:
        assert 0.0 <= metric_value(on, name) and name not in off
    assert "vllm:lora_requests_info" in on and "vllm:" not in off
    for text in (on, off):  # the plain ratio is always there
        assert 0.0 <= metric_value(text, "prefix_server_kv_cache_usage_ratio") <= 1.0
    assert 0.0 <= metric_value(on, "vllm:kv_cache_usage_perc") <= 1.0
    assert _lora_labels(on)["max_lora"] == str(int(metric_value(on, "prefix_server_kv_slots")))


def test_resident_tasks_are_listed_bounded_then_hidden_once_keys_exist(
    servers: dict[str, ServerProcess], adapter: Adapter
) -> None:
    server = servers["on"]
    _serve_tasks(server, adapter)
    labels = _lora_labels(_scrape(server))
    assert labels["running_lora_adapters"] == TASKS[-1]  # most recent first, at most 1 id
    assert labels["waiting_lora_adapters"] == ""
    body = {"name": "tenant", "scopes": ["acme:*"]}
    created = httpx.post(server.url + "/admin/keys", json=body, headers=server.admin_headers, timeout=10)
    assert created.status_code == 201, created.text
    labels = _lora_labels(_scrape(server))  # per-task labels are off now (auto): no task ids
    assert labels["running_lora_adapters"] == "" and labels["waiting_lora_adapters"] == ""
