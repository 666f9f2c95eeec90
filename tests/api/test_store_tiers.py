"""The store at scale over real HTTP: 10,000 prefixes, bounded tiers (the device tier is the KV
pool: one budget with the rows), warm, /admin/cache, metrics."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch

from prefix_store.redis_store import RedisPrefixStore, connect
from tests.redis_server import RedisProcess
from tests.server_process import ServerProcess
from tests.tiny_models import Adapter

PREFIX_BYTES = 2 * 2 * 4 * 4 * 8 * 4  # layers * k/v * heads * P=4 * head_dim * float32
BLOCK_BYTES = 2 * 2 * 4 * 16 * 8 * 4  # a pool block: 16 positions; a prefix of 4 takes one
POOL_BLOCKS, HOST_BYTES = 12, 8 * PREFIX_BYTES  # the pool: block 0 and 11 usable blocks
POOL_BYTES = (POOL_BLOCKS - 1) * BLOCK_BYTES
NUM_BULK = 10_000


@pytest.fixture(scope="module")
def tiered(
    gpt2_dir: Path, adapter: Adapter, redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A pool of 11 blocks (one row of 128 positions needs 8 and a prefix block) and room for 8
    prefixes in host memory."""
    flags = ["--model", str(gpt2_dir), "--redis-url", redis_proc.url, "--max-model-len", "128"]
    flags += ["--kv-cache-bytes", str(POOL_BLOCKS * BLOCK_BYTES), "--host-cache-bytes", str(HOST_BYTES)]
    with ServerProcess(tmp_path_factory.mktemp("tiered") / "data", *flags) as proc:
        yield proc


def _upload(client: httpx.Client, server: ServerProcess, task_id: str, seed: int) -> dict:
    torch.manual_seed(seed)
    weights = safetensors.torch.save({"prefix": torch.randn(2, 2, 4, 4, 8)})
    response = client.put(
        f"{server.url}/admin/prefixes/{task_id}",
        files={"weights": ("w", weights, "x")},
        headers=server.admin_headers,
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def _metric(metrics: str, name: str, tier: str) -> float:
    match = re.search(rf'^{name}{{tier="{tier}"}} (\S+)$', metrics, re.M)
    assert match, f"{name}{{tier={tier}}} missing"
    return float(match.group(1))


def test_tiers_stay_within_their_bytes_and_report_themselves(
    tiered: ServerProcess, client: httpx.Client
) -> None:
    for i in range(12):
        _upload(client, tiered, f"tier:{i:02d}", seed=i)
    for _ in range(2):
        for i in range(12):
            body = {"task_id": f"tier:{i:02d}", "input_ids": [5], "max_new_tokens": 2}
            assert client.post(tiered.url + "/generate", json=body).status_code == 200
    cache = client.get(tiered.url + "/admin/cache", headers=tiered.admin_headers).json()
    # one request at a time needs a prefix block and a row block: the pool keeps the 10 most
    # recent prefixes (unreferenced, evicted LRU) and one free block
    assert cache["tiers"]["device"] == {
        "capacity_bytes": POOL_BYTES,
        "resident_bytes": 10 * BLOCK_BYTES,
        "resident_prefixes": 10,
    }
    assert cache["tiers"]["host"] == {
        "capacity_bytes": HOST_BYTES,
        "resident_bytes": HOST_BYTES,
        "resident_prefixes": 8,
    }
    device_ids = [i["task_id"] for i in cache["items"] if i["tier"] == "device"]
    assert device_ids == [f"tier:{i:02d}" for i in range(2, 12)]  # the 10 most recent, least recent first
    metrics = client.get(tiered.url + "/metrics").text
    assert _metric(metrics, "prefix_server_prefix_cache_evictions_total", "device") == 24 - 10
    assert _metric(metrics, "prefix_server_prefix_cache_resident_bytes", "device") == 10 * BLOCK_BYTES
    assert _metric(metrics, "prefix_server_prefix_cache_resident_bytes", "host") == HOST_BYTES
    assert _metric(metrics, "prefix_server_prefix_cache_misses_total", "host") >= 12
    loads = float(re.search(r"^prefix_server_prefix_load_seconds_count (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    assert loads >= 12 and "prefix_server_redis_errors_total 0.0" in metrics


def test_warm_prefetches_into_host_memory_and_the_first_row_copies_it_into_the_pool(
    tiered: ServerProcess, client: httpx.Client
) -> None:
    meta = _upload(client, tiered, "warm:me", seed=99)
    warm = client.post(tiered.url + "/admin/prefixes/warm:me/warm", headers=tiered.admin_headers)
    assert warm.status_code == 200 and warm.json()["tiers"] == ["host"]
    assert warm.json()["version"] == meta["version"]
    body = {"task_id": "warm:me", "input_ids": [5]}
    scrapes = [client.get(tiered.url + "/metrics").text]
    for _ in range(2):
        assert client.post(tiered.url + "/generate", json=body).status_code == 200
        scrapes.append(client.get(tiered.url + "/metrics").text)
    host_hits = [_metric(m, "prefix_server_prefix_cache_hits_total", "host") for m in scrapes]
    device = [
        (_metric(m, "prefix_server_prefix_cache_misses_total", "device"),
         _metric(m, "prefix_server_prefix_cache_hits_total", "device"))
        for m in scrapes
    ]  # fmt: skip
    loads = [re.search(r"^prefix_server_prefix_loads_total (\S+)$", m, re.M).group(1) for m in scrapes]  # type: ignore[union-attr]
    assert host_hits == [host_hits[0] + i for i in range(3)] and len(set(loads)) == 1  # no Redis read
    misses, hits = device[0]
    assert device[1:] == [(misses + 1, hits), (misses + 1, hits + 1)]  # copied once, then shared
    again = client.post(tiered.url + "/admin/prefixes/warm:me/warm", headers=tiered.admin_headers)
    assert again.json()["tiers"] == ["device", "host"]
    assert (
        client.post(tiered.url + "/admin/prefixes/nobody/warm", headers=tiered.admin_headers).status_code
        == 404
    )
    assert client.post(tiered.url + "/admin/prefixes/warm:me/warm").status_code == 401


def test_ten_thousand_prefixes_list_by_cursor(
    tiered: ServerProcess, redis_proc: RedisProcess, client: httpx.Client
) -> None:
    fingerprint = _upload(client, tiered, "bulk:probe", seed=1)["model_fingerprint"]
    data = torch.zeros(2, 2, 4, 1, 8).numpy().tobytes()  # one position of the tiny GPT-2

    async def fill() -> None:
        redis_client = connect(redis_proc.url)
        store = RedisPrefixStore(redis_client, fingerprint)
        try:
            for start in range(0, NUM_BULK, 500):
                await asyncio.gather(
                    *(store.put(f"bulk:{i:05d}", data, 1, "float32") for i in range(start, start + 500))
                )
        finally:
            await redis_client.aclose()

    asyncio.run(fill())
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = client.get(tiered.url + "/admin/prefixes", params=params, headers=tiered.admin_headers).json()
        seen += [item["task_id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    bulk = [t for t in seen if t.startswith("bulk:") and t != "bulk:probe"]
    assert bulk == [f"bulk:{i:05d}" for i in range(NUM_BULK)]
    assert len(seen) == len(set(seen)) and pages >= NUM_BULK // 1000
    one = client.post(
        tiered.url + "/generate", json={"task_id": "bulk:04242", "input_ids": [5], "max_new_tokens": 2}
    )
    assert one.status_code == 200 and one.json()["usage"]["prefix_tokens"] == 1
    usage = client.get(tiered.url + "/admin/cache", headers=tiered.admin_headers).json()["tiers"]
    assert usage["device"]["resident_bytes"] <= POOL_BYTES and usage["host"]["resident_bytes"] <= HOST_BYTES
