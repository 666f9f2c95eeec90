"""A byte-bounded LRU of prefixes resident on the model's device, in front of Redis."""

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

import torch

from prefix_store.entry import PrefixEntry, PrefixMeta, PrefixSpec
from prefix_store.format import dtype_name, parse_upload, tensor_from_bytes, tensor_to_bytes
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
        self._generations: dict[str, int] = {}  # bumped by invalidate; guards racing loads

    async def get(self, task_id: str) -> PrefixEntry | None:
        """The task's current prefix on the device, or None if the task has none."""
        entry = self._entries.get(task_id)
        if entry is not None:
            self._entries.move_to_end(task_id)
            self.stats.hits += 1
            return entry
        self.stats.misses += 1
        pending = self._loading.get(task_id)
        if pending is None:
            pending = asyncio.ensure_future(self._load(task_id))
            self._loading[task_id] = pending
            pending.add_done_callback(lambda done: self._forget_load(task_id, done))
        return await asyncio.shield(pending)  # a caller that gives up does not cancel the others' load

    def _forget_load(self, task_id: str, done: "asyncio.Future[PrefixEntry | None]") -> None:
        if self._loading.get(task_id) is done:
            del self._loading[task_id]
        if not done.cancelled():
            done.exception()  # retrieved here, so an error nobody awaited is not logged as lost

    async def _load(self, task_id: str) -> PrefixEntry | None:
        generation = self._generations.get(task_id, 0)
        found = await self.store.get(task_id)
        if found is None:
            return None
        meta, data = found
        kv = tensor_from_bytes(data, meta.dtype, self.spec.shape(meta.prefix_len))
        entry = PrefixEntry(meta, kv.to(device=self.device, dtype=self.spec.dtype))
        self.stats.loads += 1
        if self._generations.get(task_id, 0) == generation:  # else an upload/delete raced this read
            self._insert(task_id, entry)
        return entry

    async def upload(self, task_id: str, weights: bytes, config_json: bytes | None) -> PrefixMeta:
        """Validate an upload (off the event loop) and store it as the task's new version."""
        fingerprint = self.store.fingerprint
        kv = await asyncio.to_thread(parse_upload, self.spec, weights, config_json, fingerprint)
        return await self.put(task_id, kv)

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
        """Forget the local copy and any load in flight: the next `get` reads Redis again."""
        self._generations[task_id] = self._generations.get(task_id, 0) + 1
        self._loading.pop(task_id, None)
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
