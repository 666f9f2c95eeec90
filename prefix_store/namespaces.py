"""Per-namespace indexes: built once for a store written before they existed.

Writes keep every namespace index up to date (see `layout.py` and `redis_store.py`); a store
written by the previous version has bucket indexes only. `build_namespace_indexes` runs at
start-up after the layout migration: when the marker key is absent it reads all 256 bucket
indexes once, adds every namespaced id to its namespace's index (ZADD is idempotent, so
replicas building at once or a rerun after a crash do no harm) and then sets the marker.
Until the marker is set, listing merges the bucket indexes as before.

Rolling upgrade: an id uploaded by a replica still on the previous version after the marker
was set is missing from its namespace index (scoped listings miss it) until the index is
rebuilt: `DEL` the marker key once every replica runs this version, then restart one.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prefix_store.layout import NUM_BUCKETS, KeyLayout, namespace_of

_BATCH = 1000  # ids per ZADD


async def is_built(client: Any, layout: KeyLayout) -> bool:
    return bool(await client.exists(layout.namespace_marker_key()))


async def build_namespace_indexes(client: Any, layout: KeyLayout) -> int:
    """Fill every namespace index from the bucket indexes unless already done; returns how
    many ids this call indexed (0 when the marker was set)."""
    if await is_built(client, layout):
        return 0
    pipe = client.pipeline(transaction=False)
    for bucket in range(NUM_BUCKETS):
        pipe.zrange(layout.index_key(bucket), 0, -1)
    by_namespace: dict[str, list[str]] = defaultdict(list)
    for members in await pipe.execute():
        for raw in members:
            task_id = raw.decode()
            namespace = namespace_of(task_id)
            if namespace is not None:
                by_namespace[namespace].append(task_id)
    for namespace, ids in by_namespace.items():
        key = layout.namespace_index_key(namespace)
        for start in range(0, len(ids), _BATCH):
            await client.zadd(key, dict.fromkeys(ids[start : start + _BATCH], 0))
    await client.set(layout.namespace_marker_key(), b"1")
    return sum(len(ids) for ids in by_namespace.values())
