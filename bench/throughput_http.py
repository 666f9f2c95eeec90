"""Mode E of `bench/throughput.py`: mode D's workload through the real HTTP server."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from infra.embedded_redis import free_port

sys.path.insert(0, str(Path(__file__).parent))

from throughput_modes import ROOT, _closed_loop, requests, vm_hwm_kib  # noqa: E402


def http_mixed(w: Any, workdir: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    max_len = w.prefix_len + w.prompt_max + w.new_tokens
    command = [sys.executable, "-m", "server", "--model", str(workdir / "model"), "--port", str(port),
               "--data-dir", str(workdir / "http-data"), "--device", "cpu", "--dtype", w.dtype,
               "--max-batch-size", str(w.concurrency), "--max-model-len", str(max_len),
               "--kv-cache-bytes", str(64 * 2**30), "--max-queue", "100000"]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(url)
        token = (workdir / "http-data" / "admin_token").read_text().strip()
        with httpx.Client(timeout=120) as client:
            for task in range(w.num_tasks):
                path = workdir / "adapters" / str(task)
                files = {"weights": ("w", (path / "adapter_model.safetensors").read_bytes()),
                         "config": ("c", (path / "adapter_config.json").read_bytes())}  # fmt: skip
                response = client.put(
                    f"{url}/admin/prefixes/t{task}", files=files, headers={"Authorization": f"Bearer {token}"}
                )
                response.raise_for_status()
        result = asyncio.run(_http_loop(w, url))
        result["peak_rss_kib"] = vm_hwm_kib(server.pid)  # the server's, not this client's
        return result
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


async def _http_loop(w: Any, url: str) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=w.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(task: int, prompt: list[int]) -> list[float]:
            body = {
                "task_id": f"t{task}",
                "input_ids": prompt,
                "max_new_tokens": w.new_tokens,
                "ignore_eos": True,
                "stream": True,
            }
            times = []
            async with client.stream("POST", url + "/generate", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        times += [time.perf_counter()] * len(json.loads(line[6:])["token_ids"])
            return times

        await one(0, [1, 2, 3])  # warm-up
        return await _closed_loop(w, requests(w), one)


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")
