"""One prefix version as Redis holds it: the fields of its hash, the Lua scripts that write and
delete it atomically with its indexes and event, and reading it back as `PrefixMeta`."""

from __future__ import annotations

from collections.abc import Sequence

from prefix_store.entry import PrefixMeta
from prefix_store.errors import StoreUnavailable
from prefix_store.replies import as_text

# Replace the hash wholesale (DEL first: no stale field can survive a schema change).
# KEYS: task hash, version, bucket index, event channel (same slot on Cluster), then the
# namespace index if any (not on Cluster: another slot). ARGV[9]: PUBLISH, or SPUBLISH on Cluster.
PUT_SCRIPT = """
local version = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1],
  'task_id', ARGV[1], 'version', version, 'prefix_len', ARGV[2], 'num_bytes', ARGV[3],
  'dtype', ARGV[4], 'model_fingerprint', ARGV[5], 'created_at', ARGV[6], 'data', ARGV[7],
  'source', ARGV[8])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
for i = 5, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
redis.call(ARGV[9], KEYS[4], ARGV[1])
return version
"""

# KEYS: task hash, bucket index, event channel, then the namespace index if any (not on Cluster).
DELETE_SCRIPT = """
local removed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
redis.call(ARGV[2], KEYS[3], ARGV[1])
return removed
"""

META_FIELDS: tuple[str, ...] = (
    "task_id",
    "version",
    "prefix_len",
    "num_bytes",
    "dtype",
    "model_fingerprint",
    "created_at",
    "source",
)


def check_task_id(task_id: str) -> None:
    # The API validates the full grammar; the store only guards what would break its keys.
    if not task_id or any(c.isspace() or c in "{}" for c in task_id):
        raise ValueError(f"task_id must be non-empty without whitespace or braces, got {task_id!r}")


def parse_meta(task_id: str, values: Sequence[bytes | str | None]) -> PrefixMeta:
    """Build `PrefixMeta` from raw values ordered as `META_FIELDS`."""
    text: dict[str, str] = {}
    for name, value in zip(META_FIELDS, values, strict=True):
        if value is None and name == "source":
            value = "kv"  # records written before sources were recorded
        if value is None:
            raise StoreUnavailable(f"redis record of {task_id!r} lacks field {name!r}")
        text[name] = as_text(value)
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
