"""The prefix cache (host tier in front of Redis; the device tier is the engine's KV pool) over a
real Redis store: LRU by bytes, pins, single-flight, races, coherence."""

from __future__ import annotations

import asyncio
import time

import torch

from prefix_store.entry import PrefixSpec
from prefix_store.prefix_cache import PrefixCache
from prefix_store.redis_store import RedisPrefixStore, connect
from tests.redis_server import RedisProcess

SPEC = PrefixSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, max_prefix_len=64)
BYTES_PER_POSITION = 2 * 2 * 2 * 4 * 4  # layers * k/v * heads * head_dim * float32


class CountingStore(RedisPrefixStore):
    """The real store, counting reads and optionally holding them until released."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.num_gets = 0
        self.gate: asyncio.Event | None = None

    async def get(self, task_id: str):  # type: ignore[no-untyped-def]
        self.num_gets += 1
        found = await super().get(task_id)
        if self.gate is not None:
            await self.gate.wait()
        return found


def _kv(prefix_len: int, value: float) -> torch.Tensor:
    return torch.full(SPEC.shape(prefix_len), value)


def _run(redis_proc: RedisProcess, fingerprint: str, capacity: int, body):  # type: ignore[no-untyped-def]
    """Runs `body(cache, store)` with `capacity` bytes of host memory."""

    async def main():  # type: ignore[no-untyped-def]
        client = connect(redis_proc.url)
        try:
            store = CountingStore(client, fingerprint)
            return await body(PrefixCache(store, SPEC, torch.device("cpu"), capacity), store)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_lru_by_bytes_and_hits(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(cache: PrefixCache, store: CountingStore):  # type: ignore[no-untyped-def]
        for name, length in (("a", 4), ("b", 4), ("c", 8)):
            await cache.put(name, _kv(length, 1.0))
        assert (await cache.get("a")) is not None and (await cache.get("b")) is not None
        await cache.get("a")  # a is now the most recent
        await cache.get("c")  # 8 positions: evicts b (least recent), keeps a
        resident = {r.task_id for r in cache.resident()}
        await cache.get("big")  # unknown task
        return resident, cache.host_tier.stats, cache.load_stats.loads, store.num_gets

    resident, stats, loads, num_gets = _run(redis_proc, fingerprint, 12 * BYTES_PER_POSITION, body)
    assert resident == {"a", "c"}
    assert (stats.hits, stats.misses, stats.evictions, loads) == (1, 4, 1, 3)
    assert (stats.resident_bytes, stats.resident_count) == (12 * BYTES_PER_POSITION, 2)
    assert num_gets == 4


def test_entry_larger_than_the_cache_is_served_not_kept(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(cache: PrefixCache, store: CountingStore):  # type: ignore[no-untyped-def]
        await cache.put("huge", _kv(16, 2.0))
        entry = await cache.get("huge")
        return entry, cache.host_tier.stats.resident_count

    entry, count = _run(redis_proc, fingerprint, 4 * BYTES_PER_POSITION, body)
    assert entry is not None and entry.meta.prefix_len == 16 and count == 0


def test_concurrent_misses_read_redis_once(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(cache: PrefixCache, store: CountingStore):  # type: ignore[no-untyped-def]
        await cache.put("t", _kv(3, 5.0))
        store.gate = asyncio.Event()
        waiters = [asyncio.ensure_future(cache.get("t")) for _ in range(20)]
        await asyncio.sleep(0.05)
        in_flight = (cache.loading_task_ids, cache.num_loading)
        store.gate.set()
        entries = await asyncio.gather(*waiters)
        return entries, store.num_gets, in_flight, cache.loading_task_ids

    entries, num_gets, in_flight, after = _run(redis_proc, fingerprint, 1 << 20, body)
    assert num_gets == 1 and all(e is entries[0] for e in entries)
    assert in_flight == (["t"], 20) and after == []  # one load in flight, 20 requests waiting on it


def test_upload_racing_a_load_never_leaves_the_old_version_cached(
    redis_proc: RedisProcess, fingerprint: str
) -> None:
    async def body(cache: PrefixCache, store: CountingStore):  # type: ignore[no-untyped-def]
        await cache.put("t", _kv(3, 1.0))
        store.gate = asyncio.Event()
        slow = asyncio.ensure_future(cache.get("t"))  # reads v1, then is held
        await asyncio.sleep(0.05)
        await cache.put("t", _kv(3, 2.0))  # v2 lands while v1 is in flight
        store.gate.set()
        old = await slow
        store.gate = None
        new = await cache.get("t")
        again = await cache.get("t")
        return old, new, again

    old, new, again = _run(redis_proc, fingerprint, 1 << 20, body)
    assert old is not None and old.meta.version == 1  # that request started before the upload
    assert new is not None and new.meta.version == 2 and float(new.kv[0, 0, 0, 0, 0]) == 2.0
    assert again is new


def test_delete_invalidates(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(cache: PrefixCache, store: CountingStore):  # type: ignore[no-untyped-def]
        await cache.put("t", _kv(2, 1.0))
        assert await cache.get("t") is not None
        assert await cache.delete("t") is True
        return await cache.get("t"), cache.host_tier.stats.resident_count

    assert _run(redis_proc, fingerprint, 1 << 20, body) == (None, 0)


def test_host_tier_serves_without_redis(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(cache: PrefixCache, store: CountingStore):  # type: ignore[no-untyped-def]
        for name in ("a", "b", "c"):
            await cache.put(name, _kv(4, 1.0))
            await cache.get(name)
        reads = store.num_gets
        entry = await cache.get("a")  # host hit: no Redis read, the same host tensor
        return reads, store.num_gets, entry, cache.usage(), cache.host_tier.stats

    reads, after, entry, usage, host = _run(redis_proc, fingerprint, 12 * BYTES_PER_POSITION, body)
    assert reads == after == 3 and entry is not None and entry.meta.task_id == "a"
    assert entry.kv.device.type == "cpu"
    assert list(usage) == ["host"] and usage["host"].resident_prefixes == 3  # no device tier given
    assert (host.hits, host.misses) == (1, 3)


def test_pinned_prefix_is_never_evicted(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(cache: PrefixCache, store: CountingStore):  # type: ignore[no-untyped-def]
        await cache.put("a", _kv(4, 1.0))
        await cache.put("b", _kv(4, 2.0))
        await cache.get("a")
        cache.pin("a")  # a request in flight uses it
        b = await cache.get("b")  # no room: a is pinned, so b is served but not kept
        pinned_view = {(r.task_id, r.is_pinned) for r in cache.resident()}
        cache.unpin("a")
        await cache.get("b")  # now a can go
        return b, pinned_view, {r.task_id for r in cache.resident()}

    b, pinned_view, resident = _run(redis_proc, fingerprint, 4 * BYTES_PER_POSITION, body)
    assert b is not None and b.meta.task_id == "b"
    assert pinned_view == {("a", True)}
    assert resident == {"b"}


def test_reconcile_drops_versions_changed_behind_our_back(redis_proc: RedisProcess, fingerprint: str) -> None:
    """A write this replica never heard of (lost message) is caught by the version check."""

    async def body(cache: PrefixCache, store: CountingStore):  # type: ignore[no-untyped-def]
        await cache.put("a", _kv(2, 1.0))
        await cache.put("b", _kv(2, 1.0))
        await cache.get("a")
        await cache.get("b")
        other = RedisPrefixStore(store._client, fingerprint)  # another replica's writes
        await other.put("a", b"\0" * 2 * BYTES_PER_POSITION, 2, "float32")
        await other.delete("b")
        stale = await cache.reconcile()
        return stale, cache.resident(), await cache.get("a"), await cache.get("b")

    stale, resident, a, b = _run(redis_proc, fingerprint, 1 << 20, body)
    assert stale == 2 and resident == []
    assert a is not None and a.meta.version == 2 and float(a.kv.abs().sum()) == 0.0
    assert b is None


def test_change_events_invalidate_within_a_second(redis_proc: RedisProcess, fingerprint: str) -> None:
    async def body(cache: PrefixCache, store: CountingStore):  # type: ignore[no-untyped-def]
        follower = asyncio.ensure_future(cache.keep_coherent(interval_s=3600))  # events only
        await cache.put("a", _kv(2, 1.0))
        await cache.get("a")
        await asyncio.sleep(0.2)  # subscribed
        other = RedisPrefixStore(store._client, fingerprint)
        started = time.monotonic()
        await other.put("a", b"\0" * 2 * BYTES_PER_POSITION, 2, "float32")
        while any(r.task_id == "a" for r in cache.resident()):
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started
        follower.cancel()
        return elapsed

    assert _run(redis_proc, fingerprint, 1 << 20, body) < 1.0
