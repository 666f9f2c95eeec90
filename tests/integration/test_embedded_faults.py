"""Embedded Redis killed under traffic, and a 64 MiB prefix end to end."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import safetensors.torch
import torch

from tests.integration.test_defaults import _redis_pids_for
from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import Adapter, save_tiny_model


def _wait_for(predicate, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_embedded_redis_crash_is_survived_and_repaired(
    gpt2_dir: Path, adapter: Adapter, tmp_path: Path
) -> None:
    body = {"task_id": "t:hot", "input_ids": [5, 6], "max_new_tokens": 4}
    with (
        ServerProcess(tmp_path / "data", "--model", str(gpt2_dir)) as server,
        httpx.Client(timeout=30) as client,
    ):
        port = int(re.search(r"embedded Redis at redis://127.0.0.1:(\d+)/", server.log_tail(20000)).group(1))  # type: ignore[union-attr]
        assert upload_adapter(client, server, "t:hot", adapter.weights, adapter.config).status_code == 201
        expected = client.post(server.url + "/generate", json=body).json()["token_ids"]  # now resident
        cold = upload_adapter(client, server, "t:cold", adapter.weights, adapter.config)
        assert cold.status_code == 201  # acknowledged: it must survive the crash below
        (old_pid,) = _redis_pids_for(port)
        os.kill(old_pid, signal.SIGKILL)
        hot = client.post(server.url + "/generate", json=body)
        assert hot.status_code == 200 and hot.json()["token_ids"] == expected  # resident: unaffected
        _wait_for(lambda: len(_redis_pids_for(port)) == 1 and _redis_pids_for(port)[0] != old_pid)
        _wait_for(lambda: client.get(server.url + "/ready").status_code == 200)
        after = client.post(server.url + "/generate", json={**body, "task_id": "t:cold"})
        assert after.status_code == 200, after.text
        assert after.json()["prefix_version"] == cold.json()["version"]
        assert after.json()["token_ids"] == expected  # same adapter bytes as t:hot
        assert "embedded Redis exited; restarting it" in server.log_tail(20000)


def test_a_64_mib_prefix_uploads_loads_and_serves(tmp_path: Path) -> None:
    """64 layers x 2 kv heads x 64 head_dim: 64 KiB a position in float32, so P=1024 is 64 MiB."""
    model_dir = save_tiny_model("gpt2-wide", tmp_path / "model", max_positions=1100)
    prefix = torch.randn(64, 2, 2, 1024, 64)
    weights = safetensors.torch.save({"prefix": prefix})
    assert len(weights) >= 64 * 1024 * 1024
    flags = ["--model", str(model_dir), "--max-batch-size", "2"]  # the pool (1 GiB) holds it on the device
    with ServerProcess(tmp_path / "data", *flags) as server, httpx.Client(timeout=120) as client:
        put = client.put(
            server.url + "/admin/prefixes/big:one",
            files={"weights": ("w", weights, "x")},
            headers=server.admin_headers,
        )
        assert put.status_code == 201, put.text
        assert put.json()["num_bytes"] == 64 * 1024 * 1024 and put.json()["prefix_len"] == 1024
        body = {"task_id": "big:one", "input_ids": [5, 6, 7], "max_new_tokens": 3, "ignore_eos": True}
        first = client.post(server.url + "/generate", json=body)  # cold: Redis -> host -> device
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["prefix_tokens"] == 1024
        second = client.post(server.url + "/generate", json=body)  # resident
        assert second.json()["token_ids"] == first.json()["token_ids"]
        metrics = client.get(server.url + "/metrics").text
        assert 'prefix_server_prefix_cache_resident_bytes{tier="device"} 6.7108864e+07' in metrics
