"""Where a model's prefixes live in Redis (layout 2: sharded by bucket).

A task belongs to one of `NUM_BUCKETS` buckets (CRC-32 of its id). Every key of a bucket
carries the hash tag `{<fingerprint>:b<NNN>}` (the braces are literal), so in a Redis Cluster
a bucket lives in one slot and the 256 buckets of a model spread over all primaries (3
primaries hold ~33% each, +-3% from the hash). Per bucket:

- `pfx:{fp:bNNN}:task:<task_id>`: hash with every `PrefixMeta` field plus `data` (raw bytes).
- `pfx:{fp:bNNN}:ver:<task_id>`: version counter; kept on delete so versions stay monotonic.
- `pfx:{fp:bNNN}:index`: sorted set, all scores 0, the bucket's task ids.
- `pfx:{fp:bNNN}:events` (Cluster only): the bucket's shard channel (SPUBLISH/SSUBSCRIBE).

Per tenant namespace (`acme` of `acme:summarize`; ids without `:` have none):

- `pfx:{fp:ns:<namespace>}:index`: sorted set, all scores 0, the namespace's task ids, so a
  key scoped to `acme:*` lists its tasks from one index instead of merging 256. The write
  script updates it atomically with the bucket index, on a single Redis or Sentinel only: on
  Cluster it would live in one slot while the namespace's tasks spread over every primary, so
  one dead primary would fail every upload of the namespace; Cluster listings merge the bucket
  indexes instead. Stores of the previous version have none: `namespaces.py` builds them at
  start-up.

A write (hash + version + index + event) is one Lua script over one slot. Listing merges
the 256 per-bucket indexes (see `listing.py`), which keeps every prefix listed exactly once
and in task-id byte order. On a single Redis or Sentinel, change events use the classic
channel `pfx:<fp>:events`.

Layout 1 (before issue 18) used one hash tag per model, `pfx:{fp}:...`: one slot for
everything. `migrate.py` moves it to this layout at start-up.

Changing `NUM_BUCKETS` moves tasks between buckets: it would need a migration like layout 1's.
"""

from __future__ import annotations

import zlib

NUM_BUCKETS = 256


def bucket_of(task_id: str) -> int:
    """The task's bucket: stable across processes and versions (CRC-32, not Python's hash)."""
    return zlib.crc32(task_id.encode()) % NUM_BUCKETS


def namespace_of(task_id: str) -> str | None:
    """The tenant namespace of a task id (`acme` of `acme:summarize`), or None without one."""
    namespace, sep, _ = task_id.partition(":")
    return namespace if sep else None


class KeyLayout:
    """Key and channel names of one model's prefixes."""

    def __init__(self, fingerprint: str, is_cluster: bool) -> None:
        if not fingerprint or any(c in fingerprint for c in "{}"):
            raise ValueError(f"fingerprint must be non-empty and free of braces, got {fingerprint!r}")
        self.fingerprint = fingerprint
        self.is_cluster = is_cluster

    def _bucket_prefix(self, bucket: int) -> str:
        return f"pfx:{{{self.fingerprint}:b{bucket:03d}}}:"

    def task_key(self, task_id: str) -> str:
        return f"{self._bucket_prefix(bucket_of(task_id))}task:{task_id}"

    def version_key(self, task_id: str) -> str:
        return f"{self._bucket_prefix(bucket_of(task_id))}ver:{task_id}"

    def index_key(self, bucket: int) -> str:
        return self._bucket_prefix(bucket) + "index"

    def index_key_of(self, task_id: str) -> str:
        return self.index_key(bucket_of(task_id))

    def namespace_index_key(self, namespace: str) -> str:
        return f"pfx:{{{self.fingerprint}:ns:{namespace}}}:index"

    def namespace_marker_key(self) -> str:
        """Set once every namespace index is complete (see `namespaces.py`)."""
        return f"pfx:{{{self.fingerprint}:ns}}:built"

    def channel_of(self, task_id: str) -> str:
        """Where a change of `task_id` is announced (a shard channel in the task's slot on Cluster)."""
        if self.is_cluster:
            return self._bucket_prefix(bucket_of(task_id)) + "events"
        return f"pfx:{self.fingerprint}:events"

    def channels(self) -> list[str]:
        """Every channel a listener follows."""
        if self.is_cluster:
            return [self._bucket_prefix(b) + "events" for b in range(NUM_BUCKETS)]
        return [f"pfx:{self.fingerprint}:events"]

    def publish_command(self) -> str:
        return "SPUBLISH" if self.is_cluster else "PUBLISH"


class LegacyLayout:
    """Layout 1: every key of a model behind the one hash tag `{fp}`."""

    def __init__(self, fingerprint: str) -> None:
        self.prefix = f"pfx:{{{fingerprint}}}:"
        self.index_key = self.prefix + "index"
        self.lock_key = self.prefix + "migrating"  # same slot as the keys it guards

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def version_key(self, task_id: str) -> str:
        return f"{self.prefix}ver:{task_id}"

    def version_pattern(self) -> str:
        """SCAN pattern of every version key (a deleted task keeps one)."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return escaped + "ver:*"
