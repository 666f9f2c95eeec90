"""Prefix store latency (not a test; `make bench`).

GPT-2-small-shaped prefixes (12 layers, 12 heads, head_dim 64) of P=10 and P=200, in
float32 and bfloat16, in a throwaway embedded Redis:

- cold load: `PrefixCache.get` of a task that is resident nowhere (Redis -> host -> device),
- baseline in the same run: a bare redis-py GET of the same number of bytes,
- hit path: `PrefixCache.get` of a device-resident task.

Figures are p50/p99 over repetitions and ratios to the baseline measured in this run.
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

from prefix_store.embedded_redis import EmbeddedRedis  # noqa: E402
from prefix_store.entry import PrefixSpec  # noqa: E402
from prefix_store.prefix_cache import PrefixCache  # noqa: E402
from prefix_store.redis_store import RedisPrefixStore, connect  # noqa: E402

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
    cache = PrefixCache(store, spec, torch.device("cpu"), 1 << 30, 1 << 30)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--hits", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "store_bench.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        embedded = EmbeddedRedis(Path(tmp))
        url = embedded.start()
        try:
            rows = [
                asyncio.run(_measure(url, dtype, prefix_len, args.repeats, args.hits))
                for dtype in (torch.float32, torch.bfloat16)
                for prefix_len in (10, 200)
            ]
        finally:
            embedded.stop()
    result = {"torch_threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        cold, bare = row["cold_load"], row["bare_redis_get"]
        print(
            f"{row['dtype']:>8} P={row['prefix_len']:<4} {row['num_bytes'] / 2**20:7.2f} MiB  "
            f"cold p50 {cold['p50_ms']:7.2f} ms p99 {cold['p99_ms']:7.2f} ms  "  # type: ignore[index]
            f"bare GET p50 {bare['p50_ms']:7.2f} ms  ratio {row['cold_over_bare_p50']:.2f}x  "  # type: ignore[index]
            f"hit {row['hit_path_us']:.2f} us"
        )


if __name__ == "__main__":
    main()
