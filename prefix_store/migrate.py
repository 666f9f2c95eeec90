"""Move a model's prefixes from layout 1 (one hash tag per model) to layout 2 (buckets).

Run by every server at start-up, before it serves (`migrate_layout`); a no-op once nothing
of layout 1 is left. Safe with several replicas starting at once and after a crash midway:

- a lock key (`SET NX PX`, in layout 1's slot) lets one replica migrate; the others wait
  until it is released (or expires, when its holder died) and then find nothing left to do;
- each task is copied first (one script in the task's new slot: the record only if the new
  layout has none, since a record there is newer; the version counter raised to at least the
  old one so versions stay monotonic; the bucket index), then its old keys are deleted. A
  crash between the two steps leaves a task that the next run copies again (a no-op) and
  deletes. Nothing uploaded is lost: an old key is deleted only after its copy is written.

Layout-1 keys are found from the old index (live tasks) and a SCAN of old version keys (a
deleted task keeps its counter; on Cluster, `scan_iter` visits every primary).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from infra.connection import RedisClient
from prefix_store.layout import KeyLayout, LegacyLayout

log = logging.getLogger(__name__)

_LOCK_TTL_MS = 30_000
_LOCK_WAIT_S = 600.0

# KEYS: new task hash, new version, new bucket index. ARGV: old version (or ''), task id,
# then field/value pairs of the old record (none when only a version counter is left).
_COPY_SCRIPT = """
local old_version = tonumber(ARGV[1])
if old_version and (tonumber(redis.call('GET', KEYS[2])) or 0) < old_version then
  redis.call('SET', KEYS[2], old_version)
end
if #ARGV > 2 and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
  redis.call('ZADD', KEYS[3], 0, ARGV[2])
end
return 1
"""

_UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


async def _legacy_task_ids(client: RedisClient, old: LegacyLayout) -> list[str]:
    members: list[Any] = list(await client.zrange(old.index_key, 0, -1))
    ids = {raw.decode() for raw in members}
    prefix_len = len(old.version_key(""))
    async for key in client.scan_iter(match=old.version_pattern(), count=1000):
        ids.add(key.decode()[prefix_len:])
    return sorted(ids)


async def _copy_one(client: Any, old: LegacyLayout, new: KeyLayout, task_id: str) -> None:
    record = await client.hgetall(old.task_key(task_id))
    version = await client.get(old.version_key(task_id))
    pairs = [item for field_value in record.items() for item in field_value]
    keys = [new.task_key(task_id), new.version_key(task_id), new.index_key_of(task_id)]
    await client.eval(_COPY_SCRIPT, len(keys), *keys, version or b"", task_id, *pairs)
    # only now the old keys go (one slot: layout 1 shares one hash tag)
    pipe = client.pipeline(transaction=False)
    pipe.delete(old.task_key(task_id), old.version_key(task_id))
    pipe.zrem(old.index_key, task_id)
    await pipe.execute()


async def migrate_layout(client: RedisClient, new: KeyLayout) -> int:
    """Migrate `new.fingerprint`'s layout-1 keys, if any; returns how many tasks this call moved."""
    old = LegacyLayout(new.fingerprint)
    if not await _legacy_task_ids(client, old):
        return 0
    token = secrets.token_hex(8)
    deadline = time.monotonic() + _LOCK_WAIT_S
    while not await client.set(old.lock_key, token, nx=True, px=_LOCK_TTL_MS):
        if time.monotonic() > deadline:
            raise RuntimeError(f"layout migration lock {old.lock_key} still held after {_LOCK_WAIT_S:.0f} s")
        log.info("another replica is migrating the prefix store layout: waiting")
        await asyncio.sleep(0.2)
    try:
        task_ids = await _legacy_task_ids(client, old)  # what is left after any other migrator
        if task_ids:
            log.warning("migrating %d prefixes of %s to the sharded layout", len(task_ids), new.fingerprint)
        for num_done, task_id in enumerate(task_ids):
            await _copy_one(client, old, new, task_id)
            if num_done % 100 == 99:
                await client.pexpire(old.lock_key, _LOCK_TTL_MS)  # still alive: keep the lock
        return len(task_ids)
    finally:
        await client.eval(_UNLOCK_SCRIPT, 1, old.lock_key, token)
