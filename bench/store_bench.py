"""Prefix store latency (not a test; `make bench`).

GPT-2-small-shaped prefixes (12 layers, 12 heads, head_dim 64) of P=10 and P=200, in
float32 and bfloat16, in a throwaway embedded Redis (single) and, in the same run, a
3-primary Redis Cluster on loopback (`--backends`; the cluster needs redis-server >= 7):

- cold load: `PrefixCache.get` of a task that is resident nowhere (Redis -> host -> device),
- baseline in the same run: a bare redis-py GET of the same number of bytes,
- hit path: `PrefixCache.get` of a device-resident task.

Figures are p50/p99 over repetitions and ratios to the baseline measured in this run.
With the cluster, `--cluster-prefixes N` also stores N small prefixes and reports how they
spread over the primaries and that cursor listing returns each exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.embedded_redis import EmbeddedRedis  # noqa: E402
from prefix_store.entry import PrefixSpec  # noqa: E402
from prefix_store.prefix_cache import PrefixCache  # noqa: E402
from prefix_store.redis_store import RedisPrefixStore, connect  # noqa: E402
from tests.redis_topology import ClusterSetup  # noqa: E402

LAYERS, HEADS, HEAD_DIM = 12, 12, 64


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


async def _measure(
    url: str, dtype: torch.dtype, prefix_len: int, repeats: int, hits: int
) -> dict[str, object]:
    client = connect(url)
    spec = PrefixSpec(LAYERS, HEADS, HEAD_DIM, dtype, 1024)
    store = RedisPrefixStore(client, f"bench-{str(dtype)[6:]}-{prefix_len}")
    cache = PrefixCache(store, spec, torch.device("cpu"), 1 << 30)
    try:
        meta = await cache.put("bench:task", torch.randn(spec.shape(prefix_len)).to(dtype))
        await client.set(b"bench:raw", b"\0" * meta.num_bytes)
        cold, raw = [], []
        for _ in range(repeats):
            cache.invalidate("bench:task")
            started = time.perf_counter()
            assert await cache.get("bench:task") is not None
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            await client.get(b"bench:raw")
            raw.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(hits):
            await cache.get("bench:task")
        hit_us = 1e6 * (time.perf_counter() - started) / hits
        await client.delete(b"bench:raw")
        await store.delete("bench:task")
    finally:
        await client.aclose()
    cold_q, raw_q = _quantiles(cold), _quantiles(raw)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "prefix_len": prefix_len,
        "num_bytes": meta.num_bytes,
        "cold_load": cold_q,
        "bare_redis_get": raw_q,
        "cold_over_bare_p50": cold_q["p50_ms"] / raw_q["p50_ms"],
        "hit_path_us": hit_us,
    }


async def _spread(url: str, ports: list[int], num_prefixes: int) -> dict[str, object]:
    """Store `num_prefixes` small prefixes on the cluster; per-primary share; list them all."""
    import redis

    client = connect(url)
    store = RedisPrefixStore(client, "bench-spread")
    task_ids = [f"t{i % 10}:task-{i:06d}" for i in range(num_prefixes)]
    started = time.perf_counter()
    for chunk in range(0, num_prefixes, 50):
        await asyncio.gather(*(store.put(t, b"x" * 64, 1, "float32") for t in task_ids[chunk : chunk + 50]))
    put_s = time.perf_counter() - started
    listed: list[str] = []
    cursor: str | None = None
    started = time.perf_counter()
    while True:
        items, cursor = await store.list(1000, cursor)
        listed += [m.task_id for m in items]
        if cursor is None:
            break
    list_s = time.perf_counter() - started
    await client.aclose()
    counts = []
    for port in ports:
        with redis.Redis(port=port) as node:
            counts.append(sum(1 for _ in node.scan_iter(match="pfx:{bench-spread:*}:task:*", count=1000)))
    return {
        "num_prefixes": num_prefixes,
        "per_primary": counts,
        "per_primary_share": [round(c / num_prefixes, 3) for c in counts],
        "listed_exactly_once_in_order": listed == sorted(task_ids),
        "put_seconds": round(put_s, 2),
        "list_seconds": round(list_s, 2),
    }


def _rows(url: str, backend: str, args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for prefix_len in (10, 200):
            row = asyncio.run(_measure(url, dtype, prefix_len, args.repeats, args.hits))
            rows.append({"backend": backend, **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--hits", type=int, default=20000)
    parser.add_argument("--backends", default="single,cluster", help="comma-separated: single, cluster")
    parser.add_argument("--cluster-prefixes", type=int, default=10_000, help="0: skip the spread check")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "store_bench.json")
    args = parser.parse_args()
    backends = args.backends.split(",")
    rows: list[dict[str, object]] = []
    spread: dict[str, object] | None = None
    if "single" in backends:
        with tempfile.TemporaryDirectory() as tmp:
            embedded = EmbeddedRedis(Path(tmp))
            url = embedded.start()
            try:
                rows += _rows(url, "single", args)
            finally:
                embedded.stop()
    if "cluster" in backends:
        cluster = ClusterSetup(3)
        try:
            rows += _rows(cluster.url, "cluster", args)
            if args.cluster_prefixes:
                spread = asyncio.run(_spread(cluster.url, cluster.ports, args.cluster_prefixes))
        finally:
            cluster.close()
    result = {
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "rows": rows,
        "spread": spread,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        cold, bare = row["cold_load"], row["bare_redis_get"]
        print(
            f"{row['backend']:>7} {row['dtype']:>8} P={row['prefix_len']:<4} "
            f"{row['num_bytes'] / 2**20:7.2f} MiB  "  # type: ignore[operator]
            f"cold p50 {cold['p50_ms']:7.2f} ms p99 {cold['p99_ms']:7.2f} ms  "  # type: ignore[index]
            f"bare GET p50 {bare['p50_ms']:7.2f} ms  ratio {row['cold_over_bare_p50']:.2f}x  "  # type: ignore[index]
            f"hit {row['hit_path_us']:.2f} us"
        )
    if spread is not None:
        print(f"cluster spread: {spread}")


if __name__ == "__main__":
    main()
