"""Prefix versions in Redis, shared by every replica.

Layout, namespaced by model fingerprint (the `{...}` braces are literal: they form a Redis
Cluster hash tag, so every key of one model lives in one slot and the Lua script may touch
them all):

- `pfx:{fp}:task:<task_id>`: hash with every `PrefixMeta` field plus `data` (raw bytes).
- `pfx:{fp}:ver:<task_id>`: version counter; kept on delete so versions stay monotonic.
- `pfx:{fp}:index`: sorted set, all scores 0, members task ids (lexicographic paging).

A write replaces the whole hash inside one Lua script, so a reader (one HGETALL) sees the
old version or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Protocol

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from prefix_store.entry import PrefixMeta
from prefix_store.errors import StoreUnavailable

# Replace the hash wholesale (DEL first: no stale field can survive a schema change).
_PUT_SCRIPT = """
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

_DELETE_SCRIPT = """
local removed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', KEYS[3], ARGV[1])
return removed
"""

_META_FIELDS: tuple[str, ...] = (
    "task_id",
    "version",
    "prefix_len",
    "num_bytes",
    "dtype",
    "model_fingerprint",
    "created_at",
    "source",
)
# Connection-level failures and error replies alike mean "the store cannot serve this".
REDIS_ERRORS = (RedisError, OSError)


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


def connect(url: str, max_connections: int = 64) -> redis.asyncio.Redis:
    """A binary-safe async client with timeouts fit for payloads up to 64 MiB.

    `socket_timeout` bounds each socket read/write, not a whole transfer, so 10 s leaves
    ample room for large values while a hung server still fails in bounded time. Retries
    are few and short: with Redis down a request should fail fast (503), not stall. The
    pool blocks (up to 10 s) when all connections are busy instead of failing a burst.
    """
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10.0,
        decode_responses=False,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2),
    )
    return redis.asyncio.Redis.from_pool(pool)


class RedisPrefixStore:
    """Prefix versions of one model (fingerprint) in Redis."""

    def __init__(self, client: redis.asyncio.Redis, fingerprint: str) -> None:
        if not fingerprint or any(c in fingerprint for c in "{}"):
            raise ValueError(f"fingerprint must be non-empty and free of braces, got {fingerprint!r}")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisPrefixStore needs a client with decode_responses=False (binary data)")
        self._client = client
        self._fingerprint = fingerprint
        self._prefix = f"pfx:{{{fingerprint}}}:"
        self._index_key = self._prefix + "index"
        self._events_channel = self._prefix + "events"
        self._put_script = client.register_script(_PUT_SCRIPT)
        self._delete_script = client.register_script(_DELETE_SCRIPT)
        self.num_errors = 0  # failed Redis calls, for metrics

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def _task_key(self, task_id: str) -> str:
        return f"{self._prefix}task:{task_id}"

    def _version_key(self, task_id: str) -> str:
        return f"{self._prefix}ver:{task_id}"

    async def put(
        self, task_id: str, data: bytes, prefix_len: int, dtype: str, source: str = "kv"
    ) -> PrefixMeta:
        """Store `data` as the next version of `task_id` atomically; return its metadata."""
        _check_task_id(task_id)
        created_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        keys = [self._task_key(task_id), self._version_key(task_id), self._index_key, self._events_channel]
        args: builtins.list[bytes | str | int] = [
            task_id,
            prefix_len,
            len(data),
            dtype,
            self._fingerprint,
            created_at,
            data,
            source,
        ]
        async with unavailable(self, f"put {task_id!r}"):
            version = await self._put_script(keys=keys, args=args)
        return PrefixMeta(
            task_id=task_id,
            version=int(version),
            prefix_len=prefix_len,
            num_bytes=len(data),
            dtype=dtype,
            model_fingerprint=self._fingerprint,
            created_at=created_at,
            source=source,
        )

    async def get(self, task_id: str) -> tuple[PrefixMeta, bytes] | None:
        """Metadata and bytes of the current version (one consistent snapshot), or None."""
        async with unavailable(self, f"get {task_id!r}"):
            raw = await self._client.hgetall(self._task_key(task_id))
        if not raw:
            return None
        fields = {_text(key): value for key, value in raw.items()}
        data = fields.pop("data", None)
        if not isinstance(data, bytes):
            raise StoreUnavailable(f"redis record of {task_id!r} has no binary data field")
        return _parse_meta(task_id, [fields.get(name) for name in _META_FIELDS]), data

    async def get_meta(self, task_id: str) -> PrefixMeta | None:
        """Metadata of the current version without transferring its bytes, or None."""
        async with unavailable(self, f"get_meta {task_id!r}"):
            values = await self._client.hmget(self._task_key(task_id), list(_META_FIELDS))
        if all(value is None for value in values):
            return None
        return _parse_meta(task_id, values)

    async def delete(self, task_id: str) -> bool:
        """Remove the prefix and its index entry; True when it existed.

        The version counter stays, so a later upload continues after the deleted version.
        """
        async with unavailable(self, f"delete {task_id!r}"):
            removed = await self._delete_script(
                keys=[self._task_key(task_id), self._index_key, self._events_channel], args=[task_id]
            )
        return bool(removed)

    async def list(
        self, limit: int, cursor: str | None = None, prefix: str = ""
    ) -> tuple[builtins.list[PrefixMeta], str | None]:
        """One page of metadata in task-id byte order, after `cursor` (exclusive), of the ids
        that start with `prefix`.

        Returns `(items, next_cursor)`; `next_cursor` is None on the last page. Ids whose
        hash vanished between the index read and the metadata read are skipped.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        start = b"[" + prefix.encode() if prefix else b"-"
        if cursor and cursor >= prefix:
            start = b"(" + cursor.encode()
        end = b"[" + prefix.encode() + b"\xff" if prefix else b"+"  # task ids are ASCII: \xff sorts after all
        async with unavailable(self, "list"):
            raw_ids = await self._client.zrangebylex(self._index_key, start, end, start=0, num=limit + 1)
            page_ids = [_text(raw) for raw in raw_ids[:limit]]
            pipe = self._client.pipeline(transaction=False)
            for task_id in page_ids:
                pipe.hmget(self._task_key(task_id), list(_META_FIELDS))
            rows = await pipe.execute() if page_ids else []
        items = [
            _parse_meta(task_id, values)
            for task_id, values in zip(page_ids, rows, strict=True)
            if any(value is not None for value in values)
        ]
        # The page's last id, even if its hash vanished, so the next page starts after it.
        next_cursor = page_ids[-1] if len(raw_ids) > limit else None
        return items, next_cursor

    async def versions(self, task_ids: Sequence[str]) -> dict[str, int | None]:
        """Current version of each task (None when deleted), in one round trip."""
        if not task_ids:
            return {}
        async with unavailable(self, "versions"):
            pipe = self._client.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hget(self._task_key(task_id), "version")
            raw = await pipe.execute()
        return {t: (int(v) if v is not None else None) for t, v in zip(task_ids, raw, strict=True)}

    async def listen(
        self, on_event: Callable[[str], None], on_subscribed: Callable[[], Awaitable[None]]
    ) -> None:
        """Forever: follow this model's change events (task ids), resubscribing after outages.

        `on_subscribed` runs after every (re)subscription: messages published while the
        subscription was down are lost, so the caller reconciles there.
        """
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._events_channel)
                await on_subscribed()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        on_event(_text(message["data"]))
            except (*REDIS_ERRORS, StoreUnavailable):
                self.num_errors += 1
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def ping(self) -> bool:
        """True when Redis answers; never raises."""
        try:
            return bool(await self._client.ping())
        except Exception:
            return False


def _check_task_id(task_id: str) -> None:
    # The API validates the full grammar; the store only guards what would break its keys.
    if not task_id or any(c.isspace() for c in task_id):
        raise ValueError(f"task_id must be non-empty without whitespace, got {task_id!r}")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _parse_meta(task_id: str, values: Sequence[bytes | str | None]) -> PrefixMeta:
    """Build `PrefixMeta` from raw values ordered as `_META_FIELDS`."""
    text: dict[str, str] = {}
    for name, value in zip(_META_FIELDS, values, strict=True):
        if value is None and name == "source":
            value = "kv"  # records written before sources were recorded
        if value is None:
            raise StoreUnavailable(f"redis record of {task_id!r} lacks field {name!r}")
        text[name] = _text(value)
    try:
        return PrefixMeta(
            task_id=text["task_id"],
            version=int(text["version"]),
            prefix_len=int(text["prefix_len"]),
            num_bytes=int(text["num_bytes"]),
            dtype=text["dtype"],
            model_fingerprint=text["model_fingerprint"],
            created_at=text["created_at"],
            source=text["source"],
        )
    except ValueError as exc:
        raise StoreUnavailable(f"redis record of {task_id!r} is corrupt: {exc}") from exc
