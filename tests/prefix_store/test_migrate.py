"""Layout 1 (one hash tag per model, the code before issue 18) -> layout 2, on a real Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from infra.connection import connect
from prefix_store.layout import LegacyLayout
from prefix_store.migrate import migrate_layout
from prefix_store.redis_store import RedisPrefixStore
from tests.redis_server import RedisProcess

# The write script of layout 1, verbatim from the code it replaces (commit dd64ed4).
_LEGACY_PUT = """
local version = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1],
  'task_id', ARGV[1], 'version', version, 'prefix_len', ARGV[2], 'num_bytes', ARGV[3],
  'dtype', ARGV[4], 'model_fingerprint', ARGV[5], 'created_at', ARGV[6], 'data', ARGV[7],
  'source', ARGV[8])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('PUBLISH', KEYS[4], ARGV[1])
return version
"""


async def _legacy_put(client: object, fingerprint: str, task_id: str, data: bytes) -> None:
    old = LegacyLayout(fingerprint)
    keys = [old.task_key(task_id), old.version_key(task_id), old.index_key, old.prefix + "events"]
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    args = [task_id, 2, len(data), "float32", fingerprint, now, data, "kv"]
    await client.eval(_LEGACY_PUT, 4, *keys, *args)  # type: ignore[attr-defined]


def test_two_replicas_migrate_a_legacy_store_once_and_lose_nothing(
    redis_proc: RedisProcess, fingerprint: str
) -> None:
    payloads = {f"acme:t{i:03d}": bytes([i % 251]) * (100 + i) for i in range(150)}

    async def scenario() -> None:
        a, b = connect(redis_proc.url), connect(redis_proc.url)
        try:
            for task_id, data in payloads.items():
                await _legacy_put(a, fingerprint, task_id, data)
            await _legacy_put(a, fingerprint, "acme:t000", payloads["acme:t000"])  # version 2
            await _legacy_put(a, fingerprint, "acme:gone", b"x")
            await _legacy_put(a, fingerprint, "acme:gone", b"y")
            old = LegacyLayout(fingerprint)
            await a.delete(old.task_key("acme:gone"))  # deleted at version 2: only its counter is left
            await a.zrem(old.index_key, "acme:gone")
            store_a, store_b = RedisPrefixStore(a, fingerprint), RedisPrefixStore(b, fingerprint)
            moved = await asyncio.gather(migrate_layout(a, store_a.layout), migrate_layout(b, store_b.layout))
            assert sum(moved) == len(payloads) + 1 and 0 in moved  # one replica did it all
            assert await migrate_layout(a, store_a.layout) == 0  # idempotent
            assert [k async for k in a.scan_iter(match=old.prefix.replace("{", "[{]") + "*")] == []
            for task_id, data in payloads.items():
                got = await store_b.get(task_id)
                assert got is not None and got[1] == data
                assert got[0].version == (2 if task_id == "acme:t000" else 1)
            listed, cursor = await store_a.list(1000)
            assert [m.task_id for m in listed] == sorted(payloads) and cursor is None
            assert (await store_a.put("acme:gone", b"z", 2, "float32")).version == 3  # monotonic
            assert (await store_a.put("acme:t000", b"z", 2, "float32")).version == 3
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(scenario())


def test_a_crash_between_copy_and_delete_is_repaired(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def scenario() -> None:
        client = connect(redis_proc.url)
        try:
            await _legacy_put(client, fingerprint, "t", b"old")
            store = RedisPrefixStore(client, fingerprint)
            await migrate_layout(client, store.layout)
            newer = await store.put("t", b"new", 2, "float32")  # uploaded after the migration
            await _legacy_put(client, fingerprint, "t", b"leftover")  # as if the delete never ran
            assert await migrate_layout(client, store.layout) == 1
            got = await store.get("t")
            assert got == (newer, b"new")  # the newer layout-2 record wins; the leftover is gone
            assert await client.exists(LegacyLayout(fingerprint).task_key("t")) == 0
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_migrated_legacy_store_gets_its_namespace_indexes(
    redis_proc: RedisProcess, fingerprint: str
) -> None:
    """Start-up order: layout migration, then the namespace indexes (see server/app.py)."""
    ids = [f"ns{i % 2}:t{i:02d}" for i in range(12)] + ["plain"]

    async def scenario() -> tuple[int, list[str], list[str]]:
        client = connect(redis_proc.url)
        try:
            for task_id in ids:
                await _legacy_put(client, fingerprint, task_id, b"d")
            store = RedisPrefixStore(client, fingerprint)
            await migrate_layout(client, store.layout)
            num_indexed = await store.build_namespace_indexes()
            ns1 = [m.task_id for m in (await store.list(100, None, "ns1:"))[0]]
            members = await client.zrange(store.layout.namespace_index_key("ns1"), 0, -1)
            return num_indexed, ns1, [raw.decode() for raw in members]
        finally:
            await client.aclose()

    num_indexed, ns1, members = asyncio.run(scenario())
    assert num_indexed == 12
    assert ns1 == members == sorted(t for t in ids if t.startswith("ns1:"))
