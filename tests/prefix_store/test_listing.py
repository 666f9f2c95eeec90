"""Cursor listing merged over the 256 bucket indexes: every id once, in byte order, any page size,
with ids spread evenly or piled into one bucket (which needs the second round)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from prefix_store.layout import NUM_BUCKETS, bucket_of
from prefix_store.redis_store import RedisPrefixStore, connect
from tests.redis_server import RedisProcess
from tests.redis_topology import ClusterSetup, redis7_server


def _one_bucket_ids(count: int) -> list[str]:
    """`count` ids that all hash to bucket 0."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        if bucket_of(f"hot:{i}") == 0:
            found.append(f"hot:{i}")
        i += 1
    return found


async def _walk(store: RedisPrefixStore, limit: int, prefix: str = "") -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        items, cursor = await store.list(limit, cursor, prefix)
        pages.append([m.task_id for m in items])
        if cursor is None:
            return pages


@pytest.mark.parametrize("limit", [3, 40, 1000])
def test_every_id_once_in_order(redis_proc: RedisProcess, fingerprint: str, limit: int) -> None:
    spread = [f"t{i % 5}:task-{i:04d}" for i in range(200)]
    hot = _one_bucket_ids(30)
    ids = spread + hot

    async def scenario() -> tuple[list[list[str]], list[list[str]]]:
        client = connect(redis_proc.url)
        try:
            store = RedisPrefixStore(client, fingerprint)
            await asyncio.gather(*(store.put(t, b"d", 1, "float32") for t in ids))
            return await _walk(store, limit), await _walk(store, limit, prefix="hot:")
        finally:
            await client.aclose()

    pages, hot_pages = asyncio.run(scenario())
    assert len({bucket_of(t) for t in spread}) > NUM_BUCKETS // 2
    assert [t for page in pages for t in page] == sorted(ids)
    assert all(len(page) == limit for page in pages[:-1])
    assert [t for page in hot_pages for t in page] == sorted(hot)


async def _num_range_reads(client: object) -> int:
    stats = await client.info("commandstats")  # type: ignore[attr-defined]
    return int(stats.get("cmdstat_zrangebylex", {}).get("calls", 0))


def test_a_namespace_lists_from_its_own_index_even_in_a_store_written_before_it(
    redis_proc: RedisProcess, fingerprint: str
) -> None:
    """A store of the previous version (bucket indexes only) gets its namespace indexes built
    once; then listing `t1:` reads one index (one range read per page, not 256), with the same
    pages as the bucket merge; writes and deletes keep the index current."""
    ids = [f"t{i % 5}:task-{i:04d}" for i in range(200)] + ["plain-1", "t1x:other"]

    async def scenario() -> tuple[list[list[str]], list[list[str]], int, int, int, list[str]]:
        client = connect(redis_proc.url)
        try:
            store = RedisPrefixStore(client, fingerprint)
            await asyncio.gather(*(store.put(t, b"d", 1, "float32") for t in ids))
            stale = [k async for k in client.scan_iter(match=f"pfx:{{{fingerprint}:ns*")]
            await client.delete(*stale)  # what the previous version left: no namespace index
            merged = await _walk(store, 7, prefix="t1:")
            num_indexed = await store.build_namespace_indexes()
            await client.config_resetstat()
            pages = await _walk(store, 7, prefix="t1:")
            num_reads = await _num_range_reads(client)
            await store.delete("t1:task-0001")
            await store.put("t1:late", b"d", 1, "float32")
            after = [m.task_id for m in (await store.list(100, None, "t1:"))[0]]
            again = await RedisPrefixStore(client, fingerprint).build_namespace_indexes()
            return merged, pages, num_reads, num_indexed, again, after
        finally:
            await client.aclose()

    merged, pages, num_reads, num_indexed, again, after = asyncio.run(scenario())
    expected = sorted(t for t in ids if t.startswith("t1:"))
    assert [t for page in merged for t in page] == expected
    assert pages == merged and len(pages) == 6
    assert num_reads == len(pages)  # 256 per page before: one bucket index each
    assert num_indexed == len(ids) - 1 and again == 0  # built once; `plain-1` has no namespace
    assert after == sorted([t for t in expected if t != "t1:task-0001"] + ["t1:late"])


@pytest.mark.skipif(redis7_server() is None, reason="needs redis-server >= 7 on PATH")
def test_namespace_listing_on_a_cluster(fingerprint: str) -> None:
    """On Cluster there are no namespace indexes (one slot per namespace: a dead primary would
    fail every upload of the namespace, see test_a_dead_primary_fails_only_its_tasks): a
    namespace's listing merges the bucket indexes, before and after the start-up build."""
    ids = [f"n{i % 3}:task-{i:03d}" for i in range(60)]

    async def scenario(url: str) -> tuple[list[list[str]], list[list[str]]]:
        client = connect(url)
        try:
            store = RedisPrefixStore(client, fingerprint)
            for task_id in ids:
                await store.put(task_id, b"d", 1, "float32")
            await store.delete("n1:task-001")
            merged = await _walk(store, 6, prefix="n1:")
            assert await store.build_namespace_indexes() == 0
            return merged, await _walk(store, 6, prefix="n1:")
        finally:
            await client.aclose()

    with contextlib.closing(ClusterSetup(3)) as cluster:
        merged, pages = asyncio.run(scenario(cluster.url))
    assert [t for page in merged for t in page] == sorted(
        t for t in ids if t.startswith("n1:") and t != "n1:task-001"
    )
    assert pages == merged
