"""Cursor listing over the per-bucket indexes: every task id once, in byte order.

Each bucket's index is a sorted set (lexicographic). A page of `limit` ids after the cursor
is the first `limit` ids of the union of the buckets' ranges. Round one asks every bucket for
a few ids (about twice its fair share of the page); the merged result is exact up to the
smallest last id of any bucket that returned all it was asked for (beyond it, that bucket
may hold ids not fetched). When that exact part is shorter than the page, round two asks
only those full buckets for a whole page each. Two round trips per page at most, each a
pipeline (on Cluster, one batch per primary, in parallel).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any


def lex_range(cursor: str | None, prefix: str) -> tuple[bytes, bytes]:
    """ZRANGEBYLEX bounds of the ids after `cursor` (exclusive) that start with `prefix`."""
    start = b"[" + prefix.encode() if prefix else b"-"
    if cursor and cursor >= prefix:
        start = b"(" + cursor.encode()
    end = b"[" + prefix.encode() + b"\xff" if prefix else b"+"  # task ids are ASCII: \xff sorts after all
    return start, end


async def _ranges(
    client: Any, index_keys: Sequence[str], start: bytes, end: bytes, count: int
) -> list[list[bytes]]:
    pipe = client.pipeline(transaction=False)
    for key in index_keys:
        pipe.zrangebylex(key, start, end, start=0, num=count)
    return list(await pipe.execute())


async def page_ids(
    client: Any, index_keys: Sequence[str], limit: int, cursor: str | None, prefix: str
) -> tuple[list[str], bool]:
    """`(ids, has_more)`: the next `limit` ids after `cursor` across all indexes."""
    start, end = lex_range(cursor, prefix)
    first_count = max(4, 2 * limit // max(1, len(index_keys)) + 2)
    first = await _ranges(client, index_keys, start, end, first_count)
    full = [i for i, ids in enumerate(first) if len(ids) >= first_count]
    bound = min((first[i][-1] for i in full), default=None)
    merged = _merge(first, bound)
    if full and len(merged) <= limit:  # not enough exact ids: fetch the full buckets deeper
        deeper = await _ranges(client, [index_keys[i] for i in full], start, end, limit + 1)
        for i, ids in zip(full, deeper, strict=True):
            first[i] = ids
        merged = _merge(first, None)
    page = [raw.decode() for raw in merged[: limit + 1]]
    return page[:limit], len(page) > limit


def _merge(ranges: list[list[bytes]], bound: bytes | None) -> list[bytes]:
    """The sorted union, cut after `bound` (inclusive) when given."""
    merged = list(heapq.merge(*ranges))
    if bound is None:
        return merged
    return [raw for raw in merged if raw <= bound]
