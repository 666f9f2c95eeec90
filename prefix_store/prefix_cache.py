"""Tiered prefix cache: host LRU -> Redis, coherent across replicas.

- The device tier is not here: it is the engine's KV pool (one budget with the rows' KV, one
  eviction policy), which copies a prefix from the host tensor handed out here when a row first
  needs it. `DeviceTier` lets `usage()`/`resident()` report it beside the host tier.
- The host tier is bounded by bytes, never by count; a pinned task (a request in flight holds
  it) is never evicted for space.
- A miss loads from Redis once however many requests ask (single-flight); decoding bytes
  runs off the event loop.
- Coherence: every write publishes the task id; each replica drops its copy on the message,
  and a periodic version check of everything resident catches messages lost in an outage.
  A request that already holds an entry keeps it: it finishes on the version it started with.
"""

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from prefix_store.entry import PrefixEntry, PrefixMeta, PrefixSource, PrefixSpec
from prefix_store.errors import InvalidPrefix, StoreUnavailable
from prefix_store.format import dtype_name, finish_prefix, tensor_from_bytes, tensor_to_bytes
from prefix_store.lru import ByteLRU
from prefix_store.meta import ResidentPrefix, TierUsage
from prefix_store.redis_store import RedisPrefixStore
from prefix_store.sources import parse_source

log = logging.getLogger(__name__)


@dataclass
class LoadStats:
    """Loads from Redis (counted once per single-flight load)."""

    loads: int = 0
    stale_dropped: int = 0  # entries dropped by invalidation events or version checks


class DeviceTier(Protocol):
    """The device copies of prefixes, held by whoever runs the model (the engine's KV pool)."""

    def usage(self) -> TierUsage: ...

    def resident(self) -> builtins.list[ResidentPrefix]:
        """Resident prefixes, least recently used first."""
        ...


class PrefixCache:
    """The one way the server reads and writes prefixes.

    `device`: where the model runs (a GPU reads host tensors from pinned memory);
    `device_tier`: the device copies, reported by `usage()` and `resident()` when given."""

    def __init__(
        self,
        store: RedisPrefixStore,
        spec: PrefixSpec,
        device: torch.device,
        host_bytes: int,
        on_load: Callable[[float], None] | None = None,
        encoder: Callable[[PrefixSource], Awaitable[torch.Tensor]] | None = None,
        device_tier: DeviceTier | None = None,
    ) -> None:
        self.store = store
        self.spec = spec
        self.device = device
        self.device_tier = device_tier
        self.host_tier = ByteLRU("host", host_bytes, self.is_pinned)
        self.load_stats = LoadStats()
        self.num_loading = 0  # requests waiting on a Redis load right now
        self._on_load = on_load
        self._encoder = encoder  # runs soft prompts and text through the frozen model once
        self._pins: dict[str, int] = {}
        # loads in flight; invalidate() unregisters one, which then serves its callers but caches nothing
        self._loading: dict[str, asyncio.Future[PrefixEntry | None]] = {}

    @property
    def tiers(self) -> tuple[ByteLRU, ...]:
        """The tiers held here (the device tier is the engine's)."""
        return (self.host_tier,)

    @property
    def loading_task_ids(self) -> list[str]:
        """Tasks whose prefix is being loaded from Redis right now, oldest load first."""
        return list(self._loading)

    # ---- reads ------------------------------------------------------------------------
    async def get(self, task_id: str) -> PrefixEntry | None:
        """The task's current prefix in host memory (pinned for a GPU), or None if the task has none."""
        entry = self.host_tier.get(task_id)
        if entry is not None:
            return entry
        pending = self._loading.get(task_id)
        if pending is None:
            pending = asyncio.ensure_future(self._load(task_id))
            self._loading[task_id] = pending
            pending.add_done_callback(lambda done: self._forget_load(task_id, done))
        self.num_loading += 1
        try:
            return await asyncio.shield(pending)  # a caller that gives up does not cancel the others' load
        finally:
            self.num_loading -= 1

    async def warm(self, task_id: str) -> PrefixEntry | None:
        """Load a task into the host tier ahead of traffic (prefetch); the device copy is made when
        its first row is admitted (a host -> device copy, no Redis read)."""
        return await self.get(task_id)

    def _forget_load(self, task_id: str, done: "asyncio.Future[PrefixEntry | None]") -> None:
        if self._loading.get(task_id) is done:
            del self._loading[task_id]
        if not done.cancelled():
            done.exception()  # retrieved here, so an error nobody awaited is not logged as lost

    async def _load(self, task_id: str) -> PrefixEntry | None:
        started = time.perf_counter()
        found = await self.store.get(task_id)
        if found is None:
            return None
        meta, data = found
        entry = PrefixEntry(meta, await asyncio.to_thread(self._materialize, meta, data))
        self.load_stats.loads += 1
        if self._on_load is not None:
            self._on_load(time.perf_counter() - started)
        if self._loading.get(task_id) is asyncio.current_task():  # else an upload/delete raced this read
            self.host_tier.put(task_id, entry)
        return entry

    def _materialize(self, meta: PrefixMeta, data: bytes) -> torch.Tensor:
        """Bytes -> host tensor, pinned when a GPU will copy it into the KV pool."""
        host = tensor_from_bytes(data, meta.dtype, self.spec.shape(meta.prefix_len)).to(self.spec.dtype)
        return host.pin_memory() if self.device.type == "cuda" else host

    # ---- pins ----------------------------------------------------------------------------
    def is_pinned(self, task_id: str) -> bool:
        return task_id in self._pins

    def pin(self, task_id: str) -> None:
        """A request in flight uses this task: its entries stay resident until `unpin`."""
        self._pins[task_id] = self._pins.get(task_id, 0) + 1

    def unpin(self, task_id: str) -> None:
        count = self._pins.get(task_id, 0) - 1
        if count > 0:
            self._pins[task_id] = count
        else:
            self._pins.pop(task_id, None)

    # ---- writes --------------------------------------------------------------------------
    async def upload(
        self, task_id: str, weights: bytes | None, config_json: bytes | None, text: str | None = None
    ) -> PrefixMeta:
        """Validate an upload of any kind (off the event loop), make its KV prefix, store it."""
        fingerprint = self.store.fingerprint
        source = await asyncio.to_thread(parse_source, self.spec, weights, config_json, text, fingerprint)
        kv = source.kv
        if kv is None:
            if self._encoder is None:
                raise InvalidPrefix(
                    f"{source.kind} prefixes need the model, which this store has no access to"
                )
            kv = finish_prefix(self.spec, await self._encoder(source))
        return await self.put(task_id, kv, source.kind)

    async def put(self, task_id: str, kv: torch.Tensor, source: str = "kv") -> PrefixMeta:
        """Store a new version in Redis (the source of truth), then drop the stale local copy."""
        data = await asyncio.to_thread(tensor_to_bytes, kv)
        meta = await self.store.put(task_id, data, int(kv.shape[3]), dtype_name(kv.dtype), source)
        self.invalidate(task_id)
        return meta

    async def delete(self, task_id: str) -> bool:
        is_deleted = await self.store.delete(task_id)
        self.invalidate(task_id)
        return is_deleted

    async def get_meta(self, task_id: str) -> PrefixMeta | None:
        return await self.store.get_meta(task_id)

    async def list(
        self, limit: int, cursor: str | None, prefix: str = ""
    ) -> tuple[list[PrefixMeta], str | None]:
        return await self.store.list(limit, cursor, prefix)

    async def ping(self) -> bool:
        return await self.store.ping()

    def invalidate(self, task_id: str) -> None:
        """Forget local copies and any load in flight: the next `get` reads Redis again."""
        self._loading.pop(task_id, None)
        dropped = [tier.pop(task_id) for tier in self.tiers]
        if any(entry is not None for entry in dropped):
            self.load_stats.stale_dropped += 1

    # ---- coherence -----------------------------------------------------------------------
    async def reconcile(self) -> int:
        """Drop every resident entry whose version is no longer current in Redis; returns how many tasks."""
        resident = {(task_id, e.meta.version) for tier in self.tiers for task_id, e in tier.items()}
        current = await self.store.versions(sorted({task_id for task_id, _ in resident}))
        # a task left out of `current` could not be read (its primary is down): it keeps serving
        stale = {task_id for task_id, version in resident if current.get(task_id, version) != version}
        for task_id in stale:
            self.invalidate(task_id)
        return len(stale)

    async def keep_coherent(self, interval_s: float) -> None:
        """Forever: follow change events, and check resident versions every `interval_s`."""
        listener = asyncio.ensure_future(self.store.listen(self.invalidate, self._reconcile_quietly))
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self._reconcile_quietly()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _reconcile_quietly(self) -> None:
        try:
            await self.reconcile()
        except StoreUnavailable:
            pass  # Redis down: resident entries keep serving; checked again when it is back

    def usage(self) -> dict[str, TierUsage]:
        """Per tier (device, when there is one, and host): capacity, resident bytes and count."""
        usage = {} if self.device_tier is None else {"device": self.device_tier.usage()}
        for tier in self.tiers:
            usage[tier.name] = TierUsage(
                tier.capacity_bytes, tier.stats.resident_bytes, tier.stats.resident_count
            )
        return usage

    def resident(self) -> builtins.list[ResidentPrefix]:
        """What is resident where (device first), most recently used last."""
        device = [] if self.device_tier is None else self.device_tier.resident()
        return device + [
            ResidentPrefix(
                tier.name, task_id, e.meta.version, e.meta.prefix_len, e.num_bytes, self.is_pinned(task_id)
            )
            for tier in self.tiers
            for task_id, e in tier.items()
        ]
