"""Cursor listing merged over the 256 bucket indexes: every id once, in byte order, any page size,
with ids spread evenly or piled into one bucket (which needs the second round)."""

from __future__ import annotations

import asyncio

import pytest

from prefix_store.layout import NUM_BUCKETS, bucket_of
from prefix_store.redis_store import RedisPrefixStore, connect
from tests.redis_server import RedisProcess


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
