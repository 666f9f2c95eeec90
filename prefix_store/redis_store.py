"""Prefix versions in Redis, shared by every replica.

Keys (layout 2, sharded by bucket so a Redis Cluster spreads the store over its primaries):
see `layout.py`. A write replaces the whole hash inside one Lua script over one slot, so a
reader (one HGETALL) sees the old version or the new one, never a mix.

Durability: with `min_replicas` > 0 a write is acknowledged only once `WAIT` says that many
replicas (at most as many as are connected to the task's primary) have it; otherwise the
call raises `NotReplicated` (503, retry: uploads are idempotent by content). Redis
replication is asynchronous: WAIT makes an acknowledged write survive a failover to a
replica that had it; it is no distributed commit (a write WAIT gave up on may survive or not).
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from infra.connection import RedisClient, connect, is_cluster
from prefix_store.entry import PrefixMeta
from prefix_store.errors import StoreUnavailable
from prefix_store.events import listen_classic, listen_sharded
from prefix_store.health import RedisHealth
from prefix_store.layout import NUM_BUCKETS, KeyLayout, namespace_of
from prefix_store.listing import page_ids
from prefix_store.namespaces import build_namespace_indexes, is_built
from prefix_store.record import DELETE_SCRIPT, META_FIELDS, PUT_SCRIPT, check_task_id, parse_meta
from prefix_store.replies import as_text

__all__ = ["REDIS_ERRORS", "NotReplicated", "RedisPrefixStore", "connect", "unavailable"]

# Connection-level failures and error replies alike mean "the store cannot serve this".
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)


T = TypeVar("T")


class NotReplicated(StoreUnavailable):
    """The write reached the primary but no (or too few) replicas within the wait."""


class CountsErrors(Protocol):
    num_errors: int  # failed Redis calls, for metrics


@asynccontextmanager
async def unavailable(owner: CountsErrors, action: str) -> AsyncIterator[None]:
    """Turn every Redis/socket error into `StoreUnavailable`, naming what failed; count it."""
    try:
        yield
    except REDIS_ERRORS as exc:
        owner.num_errors += 1
        raise StoreUnavailable(f"redis {action} failed: {type(exc).__name__}: {exc}") from exc


class RedisPrefixStore:
    """Prefix versions of one model (fingerprint) in Redis: single, Sentinel or Cluster."""

    def __init__(
        self, client: RedisClient, fingerprint: str, min_replicas: int = 0, wait_ms: int = 1000
    ) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisPrefixStore needs a client with decode_responses=False (binary data)")
        self._client = client
        self._is_cluster = is_cluster(client)
        self._layout = KeyLayout(fingerprint, self._is_cluster)
        self._fingerprint = fingerprint
        self._min_replicas = min_replicas
        self._wait_ms = wait_ms
        self.num_errors = 0  # failed Redis calls, for metrics
        self.num_not_replicated = 0  # writes refused because WAIT saw too few replicas
        self.health = RedisHealth()  # fed by `ping()`
        self._has_namespace_indexes = False  # set once they are known complete

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def layout(self) -> KeyLayout:
        return self._layout

    async def put(
        self, task_id: str, data: bytes, prefix_len: int, dtype: str, source: str = "kv"
    ) -> PrefixMeta:
        """Store `data` as the next version of `task_id` atomically; return its metadata.

        Raises `NotReplicated` when replicas are connected but too few confirmed the write in time.
        """
        check_task_id(task_id)
        created_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        layout = self._layout
        keys = [
            layout.task_key(task_id),
            layout.version_key(task_id),
            layout.index_key_of(task_id),
            layout.channel_of(task_id),
        ]
        namespace_key = self._namespace_key(task_id)
        if namespace_key is not None:
            keys.append(namespace_key)
        args: builtins.list[bytes | str | int] = [
            task_id, prefix_len, len(data), dtype, self._fingerprint, created_at, data, source,
            layout.publish_command(),
        ]  # fmt: skip
        async with unavailable(self, f"put {task_id!r}"):
            version = await self._retried_once_on_cluster(lambda: self._write_and_wait(keys, args))
        return PrefixMeta(
            task_id, int(version), prefix_len, len(data), dtype, self._fingerprint, created_at, source
        )

    async def _write_and_wait(self, keys: builtins.list[str], args: builtins.list[Any]) -> int:
        """Run the put script; then, on the same connection, WAIT for the replicas it must reach."""
        wanted = 0
        if self._min_replicas > 0:
            wanted = min(self._min_replicas, await self._connected_replicas(keys[0]))
        if wanted == 0:
            return int(await self._client.eval(PUT_SCRIPT, len(keys), *keys, *args))
        # WAIT counts the writes of its own connection: a non-transactional pipeline keeps both
        # commands on one connection (on Cluster: the one to the task's primary).
        pipe = self._client.pipeline(transaction=False)
        pipe.eval(PUT_SCRIPT, len(keys), *keys, *args)
        target = {"target_nodes": await self._node_of(keys[0])} if self._is_cluster else {}
        pipe.execute_command("WAIT", wanted, self._wait_ms, **target)
        version, num_acked = await pipe.execute()
        if int(num_acked) < wanted:
            self.num_not_replicated += 1
            raise NotReplicated(
                f"upload of {args[0]!r} (version {version}) reached {num_acked} of {wanted} Redis "
                f"replica(s) within {self._wait_ms} ms; retry (uploads are idempotent by content)"
            )
        return int(version)

    async def _retried_once_on_cluster(self, call: Callable[[], Awaitable[T]]) -> T:
        """Cluster: retry once after a connection error. While a primary is down, redis-py
        relearns its slot map and may, rarely, route one command of a live slot to the dead node
        or drop a live node's connection mid-command ("Connection closed by server", seen in CI).
        A write that did reach Redis before its connection dropped is then applied twice: the
        version moves by two with the same bytes, as when a client retries its upload."""
        try:
            return await call()
        except RedisConnectionError:
            if not self._is_cluster:
                raise
            self.num_errors += 1
            await asyncio.sleep(0.05)
            return await call()

    async def _node_of(self, key: str) -> Any:
        cluster: Any = self._client
        await cluster.initialize()  # a no-op once the slot map is known
        return cluster.get_node_from_key(key)

    async def _connected_replicas(self, key: str) -> int:
        """Replicas connected to the primary that holds `key` (syncing ones included: they count
        as not-yet-acknowledging, so writes wait for them until their first sync is done)."""
        target = {"target_nodes": await self._node_of(key)} if self._is_cluster else {}
        info = await self._client.info("replication", **target)
        return int(info.get("connected_slaves", 0))

    async def get(self, task_id: str) -> tuple[PrefixMeta, bytes] | None:
        """Metadata and bytes of the current version (one consistent snapshot), or None."""
        async with unavailable(self, f"get {task_id!r}"):
            key = self._layout.task_key(task_id)
            raw = await self._retried_once_on_cluster(lambda: self._client.hgetall(key))
        if not raw:
            return None
        fields = {as_text(key): value for key, value in raw.items()}
        data = fields.pop("data", None)
        if not isinstance(data, bytes):
            raise StoreUnavailable(f"redis record of {task_id!r} has no binary data field")
        return parse_meta(task_id, [fields.get(name) for name in META_FIELDS]), data

    async def get_meta(self, task_id: str) -> PrefixMeta | None:
        """Metadata of the current version without transferring its bytes, or None."""
        async with unavailable(self, f"get_meta {task_id!r}"):
            values = await self._client.hmget(self._layout.task_key(task_id), list(META_FIELDS))
        if all(value is None for value in values):
            return None
        return parse_meta(task_id, values)

    async def delete(self, task_id: str) -> bool:
        """Remove the prefix and its index entry; True when it existed.

        The version counter stays, so a later upload continues after the deleted version.
        """
        layout = self._layout
        keys = [layout.task_key(task_id), layout.index_key_of(task_id), layout.channel_of(task_id)]
        namespace_key = self._namespace_key(task_id)
        if namespace_key is not None:
            keys.append(namespace_key)
        async with unavailable(self, f"delete {task_id!r}"):
            # EVAL, not EVALSHA: a Cluster would load a missing script on every primary, dead ones too
            removed = await self._client.eval(
                DELETE_SCRIPT, len(keys), *keys, task_id, layout.publish_command()
            )
        return bool(removed)

    def _namespace_key(self, task_id: str) -> str | None:
        """Not on Cluster: a namespace's index lives in one slot while its tasks are spread over
        every primary, so one dead primary would fail every upload of the namespace; Cluster
        listings merge the bucket indexes instead."""
        namespace = namespace_of(task_id)
        if namespace is None or self._is_cluster:
            return None
        return self._layout.namespace_index_key(namespace)

    async def build_namespace_indexes(self) -> int:
        """Build the namespace indexes of a store written before they existed (once; see
        `namespaces.py`); from then on, listing a namespace reads its index only."""
        if self._is_cluster:  # see `_namespace_key`
            return 0
        async with unavailable(self, "build namespace indexes"):
            num_indexed = await build_namespace_indexes(self._client, self._layout)
            self._has_namespace_indexes = await is_built(self._client, self._layout)
        return num_indexed

    async def list(
        self, limit: int, cursor: str | None = None, prefix: str = ""
    ) -> tuple[builtins.list[PrefixMeta], str | None]:
        """One page of metadata in task-id byte order, after `cursor` (exclusive), of the ids
        that start with `prefix`.

        Returns `(items, next_cursor)`; `next_cursor` is None on the last page. Ids whose
        hash vanished between the index read and the metadata read are skipped. A `prefix`
        within one namespace (`acme:`, `acme:sum`) reads that namespace's index only.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        index_keys = [self._layout.index_key(b) for b in range(NUM_BUCKETS)]
        namespace = namespace_of(prefix)
        if namespace is not None and self._has_namespace_indexes:  # one index, not 256
            index_keys = [self._layout.namespace_index_key(namespace)]
        async with unavailable(self, "list"):
            ids, has_more = await page_ids(self._client, index_keys, limit, cursor, prefix)
            pipe = self._client.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(self._layout.task_key(task_id), list(META_FIELDS))
            rows = await pipe.execute() if ids else []
        items = [
            parse_meta(task_id, values)
            for task_id, values in zip(ids, rows, strict=True)
            if any(value is not None for value in values)
        ]
        # The page's last id, even if its hash vanished, so the next page starts after it.
        return items, (ids[-1] if has_more else None)

    async def versions(self, task_ids: Sequence[str]) -> dict[str, int | None]:
        """Current version of each task (None when deleted), in one round trip.

        A task whose primary cannot answer (Cluster, one shard down) is left out, so the
        caller keeps its resident copy; if no task could be read, `StoreUnavailable`.
        """
        if not task_ids:
            return {}
        async with unavailable(self, "versions"):
            pipe = self._client.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hget(self._layout.task_key(task_id), "version")
            raw = await pipe.execute(raise_on_error=False)
        found = {
            t: (int(v) if v is not None else None)
            for t, v in zip(task_ids, raw, strict=True)
            if not isinstance(v, Exception)
        }
        if not found:
            self.num_errors += 1
            raise StoreUnavailable(f"redis versions failed: {next(iter(raw))}")
        return found

    async def listen(
        self, on_event: Callable[[str], None], on_subscribed: Callable[[], Awaitable[None]]
    ) -> None:
        """Forever: follow this model's change events (task ids), resubscribing after outages.

        `on_subscribed` runs after every (re)subscription: messages published while the
        subscription was down are lost, so the caller reconciles there. See `events.py`.
        """
        if self._is_cluster:
            await listen_sharded(
                self._client, self._layout.channels(), on_event, on_subscribed, self._count_error
            )
        while True:
            try:
                await listen_classic(self._client, self._layout.channels(), on_event, on_subscribed)  # type: ignore[arg-type]
            except (*REDIS_ERRORS, StoreUnavailable):
                self.num_errors += 1
                await asyncio.sleep(0.2)

    def _count_error(self) -> None:
        self.num_errors += 1

    async def ping(self) -> bool:
        """True when Redis answers (on Cluster: at least one primary); never raises.
        Also feeds `health` (on Cluster, up means every primary answered)."""
        try:
            if not self._is_cluster:
                is_ok = bool(await self._client.ping())
                self.health.observe(is_ok)
                return is_ok
            cluster: Any = self._client
            await cluster.initialize()
            nodes = cluster.get_primaries()
            answers = await asyncio.gather(
                *(cluster.ping(target_nodes=node) for node in nodes), return_exceptions=True
            )
            oks = [answer is True for answer in answers]
            self.health.observe(bool(oks) and all(oks))
            return any(oks)
        except Exception:
            self.health.observe(False)
            return False
