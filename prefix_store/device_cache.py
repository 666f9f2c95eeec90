"""A byte-bounded LRU of prefixes resident on the model's device, in front of Redis."""

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

import torch

from prefix_store.entry import PrefixEntry, PrefixMeta, PrefixSpec
from prefix_store.format import dtype_name, tensor_from_bytes, tensor_to_bytes
from prefix_store.redis_store import RedisPrefixStore


@dataclass
class CacheStats:
    """Counters read by the metrics collector at scrape time."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    resident_bytes: int = 0
    resident_count: int = 0


class PrefixCache:
    """Serves prefixes from device memory; loads misses from Redis once (single-flight).

    Eviction is by bytes, never by count. A row that is running copied its prefix into its
    KV slot at admission, so evicting an entry never pulls memory from under a running row.
    """

    def __init__(
        self, store: RedisPrefixStore, spec: PrefixSpec, device: torch.device, capacity_bytes: int
    ) -> None:
        self.store = store
        self.spec = spec
        self.device = device
        self.capacity_bytes = capacity_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._loading: dict[str, asyncio.Future[PrefixEntry | None]] = {}

    async def get(self, task_id: str) -> PrefixEntry | None:
        """The task's current prefix on the device, or None if the task has none."""
        entry = self._entries.get(task_id)
        if entry is not None:
            self._entries.move_to_end(task_id)
            self.stats.hits += 1
            return entry
        self.stats.misses += 1
        pending = self._loading.get(task_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[PrefixEntry | None] = asyncio.get_running_loop().create_future()
        self._loading[task_id] = future
        try:
            entry = await self._load(task_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters, if any, get it from await
            raise
        else:
            future.set_result(entry)
            return entry
        finally:
            del self._loading[task_id]

    async def _load(self, task_id: str) -> PrefixEntry | None:
        found = await self.store.get(task_id)
        if found is None:
            return None
        meta, data = found
        kv = tensor_from_bytes(data, meta.dtype, self.spec.shape(meta.prefix_len))
        entry = PrefixEntry(meta, kv.to(device=self.device, dtype=self.spec.dtype))
        self.stats.loads += 1
        self._insert(task_id, entry)
        return entry

    async def put(self, task_id: str, kv: torch.Tensor) -> PrefixMeta:
        """Store a new version in Redis (the source of truth), then drop the stale local copy."""
        prefix_len = int(kv.shape[3])
        meta = await self.store.put(task_id, tensor_to_bytes(kv), prefix_len, dtype_name(kv.dtype))
        self.invalidate(task_id)
        return meta

    async def delete(self, task_id: str) -> bool:
        is_deleted = await self.store.delete(task_id)
        self.invalidate(task_id)
        return is_deleted

    async def get_meta(self, task_id: str) -> PrefixMeta | None:
        return await self.store.get_meta(task_id)

    async def list(self, limit: int, cursor: str | None) -> tuple[list[PrefixMeta], str | None]:
        return await self.store.list(limit, cursor)

    async def ping(self) -> bool:
        return await self.store.ping()

    def invalidate(self, task_id: str) -> None:
        entry = self._entries.pop(task_id, None)
        if entry is not None:
            self._account(entry, -1)

    def _insert(self, task_id: str, entry: PrefixEntry) -> None:
        if entry.num_bytes > self.capacity_bytes:
            return  # served this once, but it would evict everything: not kept
        self.invalidate(task_id)
        while self._entries and self.stats.resident_bytes + entry.num_bytes > self.capacity_bytes:
            _, victim = self._entries.popitem(last=False)
            self._account(victim, -1)
            self.stats.evictions += 1
        self._entries[task_id] = entry
        self._account(entry, +1)

    def _account(self, entry: PrefixEntry, sign: int) -> None:
        self.stats.resident_bytes += sign * entry.num_bytes
        self.stats.resident_count += sign
