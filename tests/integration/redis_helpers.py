"""HTTP helpers shared by the Sentinel and Cluster tests (tiny GPT-2: 2 layers, 4 heads, head_dim 8)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import httpx
import safetensors.torch
import torch

from tests.server_process import ServerProcess

LAYERS, HEADS, HEAD_DIM = 2, 4, 8


def canonical(seed: int, prefix_len: int = 2) -> tuple[bytes, str]:
    """A canonical prefix upload and the sha256 of the tensor bytes the store must hold."""
    tensor = torch.randn(
        LAYERS, 2, HEADS, prefix_len, HEAD_DIM, generator=torch.Generator().manual_seed(seed)
    )
    return safetensors.torch.save({"prefix": tensor}), hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def upload(client: httpx.Client, server: ServerProcess, task_id: str, weights: bytes) -> httpx.Response:
    files = {"weights": ("p", weights, "application/octet-stream")}
    return client.put(f"{server.url}/admin/prefixes/{task_id}", files=files, headers=server.admin_headers)


def generate(
    client: httpx.Client, server: ServerProcess, task_id: str, key: str | None = None
) -> httpx.Response:
    body = {"task_id": task_id, "input_ids": [5, 6, 7], "max_new_tokens": 2, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post(server.url + "/generate", json=body, headers=headers)


def create_key(client: httpx.Client, server: ServerProcess, **limits: object) -> httpx.Response:
    body = {"name": "t", "scopes": ["*"], **limits}
    return client.post(server.url + "/admin/keys", json=body, headers=server.admin_headers)


def seconds_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> float:
    """Seconds until `predicate()` holds (raises after `timeout_s`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if predicate():
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise AssertionError(f"not reached within {timeout_s} s")
