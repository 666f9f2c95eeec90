"""`prefix-serve` with no model and no Redis URL: the embedded demo model and embedded Redis."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import safetensors.torch
import torch

from tests.server_process import ServerProcess


def _redis_pids_for(port: int) -> list[int]:
    """redis-server processes listening on `port` (Redis retitles itself `redis-server host:port`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "redis-server" in cmdline and f":{port}" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_embedded_defaults_print_url_and_token_and_persist(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir)
    with server, httpx.Client(timeout=30) as client:
        log = server.log_tail(20000)
        assert f"listening on http://127.0.0.1:{server.port}" in log
        # not a terminal (a log file): the new token is saved, not printed
        assert server.admin_token not in log
        assert f"new admin token saved in {data_dir / 'admin_token'}" in log
        assert (data_dir / "models" / "demo" / "config.json").exists()
        redis_port = int(re.search(r"embedded Redis at redis://127.0.0.1:(\d+)/", log).group(1))  # type: ignore[union-attr]
        assert len(_redis_pids_for(redis_port)) == 1
        # the demo model: 4 layers, 4 heads of 32
        prefix = safetensors.torch.save({"prefix": torch.randn(4, 2, 4, 6, 32)})
        put = client.put(
            server.url + "/admin/prefixes/demo:hello",
            files={"weights": ("p.safetensors", prefix, "application/octet-stream")},
            headers=server.admin_headers,
        )
        assert put.status_code == 201, put.text
        first = client.post(
            server.url + "/generate", json={"task_id": "demo:hello", "prompt": "Hi", "max_new_tokens": 8}
        )
        assert first.status_code == 200, first.text
    assert _redis_pids_for(redis_port) == []  # the embedded Redis stops with the server
    token = server.admin_token
    with ServerProcess(data_dir) as again, httpx.Client(timeout=30) as client:
        assert again.admin_token == token  # saved once, reused
        again_out = client.post(
            again.url + "/generate", json={"task_id": "demo:hello", "prompt": "Hi", "max_new_tokens": 8}
        )
        assert again_out.json()["token_ids"] == first.json()["token_ids"]
        assert again_out.json()["prefix_version"] == 1
    assert os.stat(data_dir / "admin_token").st_mode & 0o077 == 0
