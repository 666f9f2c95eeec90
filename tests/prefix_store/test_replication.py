"""Uploads wait for a replica (WAIT on the write's own connection) when one is connected."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis

from infra.connection import connect
from prefix_store.redis_store import NotReplicated, RedisPrefixStore
from tests.redis_topology import RedisProcs, redis7_server

pytestmark = pytest.mark.skipif(redis7_server() is None, reason="needs redis-server >= 7 on PATH")


@pytest.fixture(scope="module")
def primary_and_replica() -> Iterator[tuple[RedisProcs, int, int]]:
    with contextlib.closing(RedisProcs("test-wait-")) as procs:
        fast_sync = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        primary = procs.spawn("primary", fast_sync)
        replica = procs.spawn("replica", ["--replicaof", "127.0.0.1", str(primary)])
        deadline = time.monotonic() + 20
        with redis.Redis(port=primary) as client:
            while "online" not in str(client.info("replication").get("slave0", "")):
                assert time.monotonic() < deadline, "the replica never came online"
                time.sleep(0.05)
        yield procs, primary, replica


def test_an_acknowledged_upload_is_on_the_replica(primary_and_replica: tuple[RedisProcs, int, int]) -> None:
    _, primary, replica = primary_and_replica

    async def body() -> None:
        client = connect(f"redis://127.0.0.1:{primary}/0")
        try:
            store = RedisPrefixStore(client, "fp-wait", min_replicas=1, wait_ms=2000)
            for i in range(20):
                meta = await store.put(f"t{i}", bytes([i]) * 1000, 1, "float32")
                with redis.Redis(port=replica) as on_replica:  # no sleep: WAIT already confirmed it
                    assert (
                        on_replica.hget(store.layout.task_key(f"t{i}"), "version")
                        == str(meta.version).encode()
                    )
        finally:
            await client.aclose()

    asyncio.run(body())


def test_a_stalled_replica_makes_the_upload_fail(primary_and_replica: tuple[RedisProcs, int, int]) -> None:
    procs, primary, replica = primary_and_replica

    async def body() -> float:
        client = connect(f"redis://127.0.0.1:{primary}/0")
        store = RedisPrefixStore(client, "fp-wait", min_replicas=1, wait_ms=300)
        unsafe = RedisPrefixStore(client, "fp-wait", min_replicas=0)
        os.kill(procs.procs[replica].pid, signal.SIGSTOP)  # connected, but acknowledges nothing
        try:
            started = time.monotonic()
            with pytest.raises(NotReplicated, match="reached 0 of 1"):
                await store.put("stalled", b"x", 1, "float32")
            waited = time.monotonic() - started
            assert store.num_not_replicated == 1
            await unsafe.put("stalled", b"y", 1, "float32")  # --redis-min-replicas 0: no wait
            return waited
        finally:
            os.kill(procs.procs[replica].pid, signal.SIGCONT)
            await client.aclose()

    waited = asyncio.run(body())
    assert 0.3 <= waited < 2.0


def test_without_replicas_nothing_waits(primary_and_replica: tuple[RedisProcs, int, int]) -> None:
    procs, _, _ = primary_and_replica
    alone = procs.spawn("alone", [])

    async def body() -> float:
        client = connect(f"redis://127.0.0.1:{alone}/0")
        try:
            store = RedisPrefixStore(client, "fp-wait", min_replicas=1, wait_ms=5000)
            started = time.monotonic()
            await store.put("t", b"x", 1, "float32")
            return time.monotonic() - started
        finally:
            await client.aclose()

    assert asyncio.run(body()) < 1.0
