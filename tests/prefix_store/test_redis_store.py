"""RedisPrefixStore against a real, throwaway redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import redis.asyncio

from prefix_store.entry import PrefixMeta
from prefix_store.errors import StoreUnavailable
from prefix_store.redis_store import RedisPrefixStore, connect
from tests.redis_server import RedisProcess

T = TypeVar("T")


def run_with_store(url: str, fingerprint: str, body: Callable[[RedisPrefixStore], Awaitable[T]]) -> T:
    """Run `body(store)` in a fresh event loop with a client that lives only inside it."""

    async def scenario() -> T:
        client = connect(url)
        try:
            return await body(RedisPrefixStore(client, fingerprint))
        finally:
            await client.aclose()

    return asyncio.run(scenario())


def test_put_get_round_trip_keeps_exact_bytes(redis_proc: RedisProcess, fingerprint: str) -> None:
    data = bytes(range(256)) * 40 + b"\x00\r\n"

    async def body(store: RedisPrefixStore) -> None:
        meta = await store.put("acme:summarize", data, prefix_len=7, dtype="bfloat16")
        assert meta.task_id == "acme:summarize"
        assert meta.version == 1
        assert (meta.prefix_len, meta.num_bytes, meta.dtype) == (7, len(data), "bfloat16")
        assert meta.model_fingerprint == fingerprint
        created = datetime.fromisoformat(meta.created_at)
        assert created.utcoffset() == timedelta(0)
        assert abs((datetime.now(UTC) - created).total_seconds()) < 60
        got = await store.get("acme:summarize")
        assert got == (meta, data)
        assert await store.get("missing") is None
        assert await store.get_meta("missing") is None

    run_with_store(redis_proc.url, fingerprint, body)


def test_versions_stay_monotonic_after_delete(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(store: RedisPrefixStore) -> None:
        versions = [(await store.put("t", b"x" * i, 1, "float32")).version for i in range(1, 4)]
        assert versions == [1, 2, 3]
        assert await store.delete("t") is True
        assert await store.delete("t") is False
        again = await store.put("t", b"new", 1, "float32")
        assert again.version == 4
        assert await store.get("t") == (again, b"new")

    run_with_store(redis_proc.url, fingerprint, body)


def test_get_meta_does_not_transfer_data(redis_proc: RedisProcess, fingerprint: str) -> None:
    data = b"\xab" * (1 << 20)

    async def output_bytes(client: redis.asyncio.Redis) -> int:
        return int((await client.info("stats"))["total_net_output_bytes"])

    async def body(store: RedisPrefixStore) -> None:
        meta = await store.put("big", data, prefix_len=3, dtype="float16")
        async with connect(redis_proc.url) as probe:
            before = await output_bytes(probe)
            assert await store.get_meta("big") == meta
            sent = await output_bytes(probe) - before
        assert sent < 64 * 1024, f"get_meta made Redis send {sent} bytes"

    run_with_store(redis_proc.url, fingerprint, body)


def test_list_paginates_every_id_once_in_order(redis_proc: RedisProcess, fingerprint: str) -> None:
    task_ids = [f"tenant{i % 3}:task-{i:02d}" for i in range(25)]

    async def body(store: RedisPrefixStore) -> list[tuple[list[PrefixMeta], str | None]]:
        assert await store.list(10, None) == ([], None)
        for task_id in reversed(task_ids):
            await store.put(task_id, task_id.encode(), 2, "float32")
        pages = []
        cursor: str | None = None
        while True:
            items, cursor = await store.list(10, cursor)
            pages.append((items, cursor))
            if cursor is None:
                return pages
            assert len(pages) < 5, "pagination does not end"

    pages = run_with_store(redis_proc.url, fingerprint, body)
    assert [len(items) for items, _ in pages] == [10, 10, 5]
    listed = [meta.task_id for items, _ in pages for meta in items]
    assert listed == sorted(task_ids)
    assert [cursor for _, cursor in pages] == [listed[9], listed[19], None]
    assert all(meta.num_bytes == len(meta.task_id) for items, _ in pages for meta in items)


def test_list_with_exact_page_size_has_no_next_cursor(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(store: RedisPrefixStore) -> None:
        for i in range(4):
            await store.put(f"t{i}", b"d", 1, "float32")
        items, cursor = await store.list(4, None)
        assert [m.task_id for m in items] == ["t0", "t1", "t2", "t3"] and cursor is None
        assert await store.list(10, "t3") == ([], None)
        with pytest.raises(ValueError, match="limit"):
            await store.list(0, None)

    run_with_store(redis_proc.url, fingerprint, body)


def test_list_skips_ids_whose_hash_vanished(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(store: RedisPrefixStore) -> None:
        for task_id in ("a", "b", "c"):
            await store.put(task_id, b"d", 1, "float32")
        # Simulate a delete landing between the index read and the metadata read.
        async with connect(redis_proc.url) as raw:
            await raw.delete(store.layout.task_key("b"))
        items, cursor = await store.list(2, None)
        assert [m.task_id for m in items] == ["a"] and cursor == "b"
        items, cursor = await store.list(2, cursor)
        assert [m.task_id for m in items] == ["c"] and cursor is None

    run_with_store(redis_proc.url, fingerprint, body)


def test_delete_removes_from_get_and_list(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(store: RedisPrefixStore) -> None:
        await store.put("keep", b"k", 1, "float32")
        await store.put("gone", b"g", 1, "float32")
        assert await store.delete("gone") is True
        assert await store.get("gone") is None
        assert await store.get_meta("gone") is None
        items, cursor = await store.list(10, None)
        assert [m.task_id for m in items] == ["keep"] and cursor is None

    run_with_store(redis_proc.url, fingerprint, body)


def test_fingerprints_are_isolated(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(store_a: RedisPrefixStore) -> None:
        store_b = RedisPrefixStore(store_a._client, fingerprint + "-other")
        await store_a.put("shared", b"A", 1, "float32")
        await store_a.put("shared", b"A2", 1, "float32")
        meta_b = await store_b.put("shared", b"B", 2, "float16")
        assert meta_b.version == 1 and meta_b.model_fingerprint == fingerprint + "-other"
        assert (await store_a.get("shared")) is not None
        assert (await store_a.get("shared"))[1] == b"A2"  # type: ignore[index]
        assert await store_b.get("shared") == (meta_b, b"B")
        await store_a.put("only-a", b"x", 1, "float32")
        assert [m.task_id for m in (await store_b.list(10, None))[0]] == ["shared"]
        assert await store_b.delete("shared") is True
        assert await store_a.get_meta("shared") is not None
        assert await store_b.get("only-a") is None

    run_with_store(redis_proc.url, fingerprint, body)


def test_concurrent_readers_never_see_a_mix_of_versions(redis_proc: RedisProcess, fingerprint: str) -> None:
    def payload(k: int) -> bytes:
        return bytes([k % 251]) * (4096 + 37 * k)

    async def body(store: RedisPrefixStore) -> list[Any]:
        first = await store.put("hot", payload(0), prefix_len=0, dtype="float32")
        version_to_k = {first.version: 0}

        async def write(k: int) -> None:
            meta = await store.put("hot", payload(k), prefix_len=k, dtype="float32")
            version_to_k[meta.version] = k

        ops: list[Awaitable[Any]] = []
        for k in range(1, 101):
            ops += [write(k), store.get("hot")]
        results = await asyncio.gather(*ops)
        reads = [r for r in results if r is not None]
        assert len(reads) == 100
        for meta, data in reads:
            k = version_to_k[meta.version]
            assert meta.prefix_len == k and meta.num_bytes == len(data) and data == payload(k)
        return reads

    run_with_store(redis_proc.url, fingerprint, body)


def test_64_mib_payload_round_trip(redis_proc: RedisProcess, fingerprint: str) -> None:
    data = bytes(range(256)) * (64 * 1024 * 1024 // 256)

    async def body(store: RedisPrefixStore) -> None:
        meta = await store.put("huge", data, prefix_len=1024, dtype="float32")
        assert meta.num_bytes == 64 * 1024 * 1024
        got = await store.get("huge")
        assert got is not None and got[0] == meta and got[1] == data
        assert await store.delete("huge")

    run_with_store(redis_proc.url, fingerprint, body)


def test_store_unavailable_while_redis_is_down_then_recovers(fingerprint: str) -> None:
    async def body(proc: RedisProcess) -> None:
        client = connect(proc.url)
        store = RedisPrefixStore(client, fingerprint)
        try:
            before = await store.put("t", b"durable", 1, "float32")
            proc.stop(kill=True)
            assert await store.ping() is False
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.put("t", b"x", 1, "float32"),
                lambda: store.get("t"),
                lambda: store.get_meta("t"),
                lambda: store.delete("t"),
                lambda: store.list(10, None),
            ]
            for call in calls:
                with pytest.raises(StoreUnavailable, match="redis"):
                    await call()
            proc.start()  # same port; AOF with fsync always kept the acknowledged write
            assert await store.ping() is True
            assert await store.get("t") == (before, b"durable")
            assert (await store.put("t", b"after", 1, "float32")).version == 2
        finally:
            await client.aclose()

    with RedisProcess(persistent=True) as proc:
        asyncio.run(body(proc))


def test_rejects_clients_and_fingerprints_that_would_break_keys() -> None:
    decoding = redis.asyncio.Redis(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisPrefixStore(decoding, "fp")
    binary = redis.asyncio.Redis()
    for bad in ("", "a{b", "a}b"):
        with pytest.raises(ValueError, match="fingerprint"):
            RedisPrefixStore(binary, bad)


def test_list_by_prefix_pages_only_matching_ids(redis_proc: RedisProcess, fingerprint: str) -> None:
    """`prefix` bounds the listing to ids that start with it, with the cursor paging inside it."""
    ids = ["acme", "acme:a", "acme:b", "acme:c", "acmeco:a", "beta:a", "zz"]

    async def body(store: RedisPrefixStore) -> list[list[str]]:
        for task_id in ids:
            await store.put(task_id, b"x", 1, "float32")
        pages, cursor = [], None
        while True:
            items, cursor = await store.list(2, cursor, prefix="acme:")
            pages.append([m.task_id for m in items])
            if cursor is None:
                break
        before, _ = await store.list(10, "a", prefix="beta:")  # a cursor before the range
        after, _ = await store.list(10, "c", prefix="beta:")  # a cursor past it
        return [*pages, [m.task_id for m in before], [m.task_id for m in after]]

    for task_id in ids:
        run_with_store(redis_proc.url, fingerprint, lambda s, t=task_id: s.delete(t))  # type: ignore[misc]
    assert run_with_store(redis_proc.url, fingerprint, body) == [
        ["acme:a", "acme:b"],
        ["acme:c"],
        ["beta:a"],
        [],
    ]
