"""A Cluster with a replica per primary: uploads wait for the replica (WAIT on the task's primary),
and after a primary is killed its replica takes over with every acknowledged upload."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch
from redis.crc import key_slot

from infra.connection import connect
from prefix_store.entry import PrefixSpec
from prefix_store.errors import StoreUnavailable
from prefix_store.prefix_cache import PrefixCache
from prefix_store.redis_store import RedisPrefixStore
from tests.redis_topology import ClusterSetup, redis7_server

pytestmark = pytest.mark.skipif(redis7_server() is None, reason="needs redis-server >= 7 on PATH")


def _slot(store: RedisPrefixStore, task_id: str) -> int:
    return int(key_slot(store.layout.task_key(task_id).encode()))


def test_acknowledged_uploads_survive_a_primary_crash() -> None:
    with contextlib.closing(ClusterSetup(3, replicas_per_primary=1)) as cluster:
        primaries = [port for port in cluster.ports if cluster.slots_of(port)]

        async def scenario() -> float:
            client = connect(cluster.url)
            try:
                store = RedisPrefixStore(client, "fp-failover", min_replicas=1, wait_ms=2000)
                payloads = {f"t{i}": bytes([i]) * (500 + i) for i in range(60)}
                for task_id, data in payloads.items():
                    await store.put(task_id, data, 1, "float32")
                victim = primaries[0]
                victim_slots = cluster.slots_of(victim)
                on_victim = [
                    t for t in payloads if key_slot(store.layout.task_key(t).encode()) in victim_slots
                ]
                assert on_victim
                cluster.kill(victim)
                started = time.monotonic()
                while True:
                    try:
                        got = await store.get(on_victim[0])
                        break
                    except StoreUnavailable:
                        assert time.monotonic() - started < 15, "the replica never took over"
                        await asyncio.sleep(0.1)
                failover_s = time.monotonic() - started
                assert got is not None and got[1] == payloads[on_victim[0]]
                for task_id, data in payloads.items():
                    found = await store.get(task_id)
                    assert found is not None and found[1] == data, task_id
                assert (await store.put(on_victim[0], b"after", 1, "float32")).version == 2
                return failover_s
            finally:
                await client.aclose()

        failover_s = asyncio.run(scenario())
        print(f"\ncluster failover: the killed primary's tasks readable again after {failover_s:.2f} s")


def test_a_dead_primary_without_replica_keeps_other_tasks_serving() -> None:
    """No replica: the dead primary's resident prefixes keep serving (the version check cannot
    read them, which is not a change), and uploads of tasks on live primaries go on at once."""
    spec = PrefixSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, max_prefix_len=8)
    with contextlib.closing(ClusterSetup(3)) as cluster:
        dead_port = cluster.ports[1]
        dead_slots = cluster.slots_of(dead_port)

        async def scenario() -> None:
            client = connect(cluster.url)
            try:
                store = RedisPrefixStore(client, "fp-dead-primary")
                cache = PrefixCache(store, spec, torch.device("cpu"), 1 << 20)
                ids = [f"t{i}" for i in range(40)]
                dead = next(t for t in ids if _slot(store, t) in dead_slots)
                alive = [t for t in ids if _slot(store, t) not in dead_slots]
                for task_id in (dead, alive[0]):
                    await cache.put(task_id, torch.ones(spec.shape(2)))
                    assert await cache.get(task_id) is not None
                cluster.kill(dead_port)
                assert await cache.reconcile() == 0
                assert {entry.task_id for entry in cache.resident()} == {dead, alive[0]}
                for task_id in alive[1:]:  # right after the kill, while redis-py relearns the map
                    assert (await cache.put(task_id, torch.ones(spec.shape(2)))).version == 1
                with pytest.raises(StoreUnavailable):
                    await cache.put(dead, torch.ones(spec.shape(2)))
            finally:
                await client.aclose()

        asyncio.run(scenario())
