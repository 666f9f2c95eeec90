"""The paged pool's metrics as `/metrics` renders them, from an engine stats record: blocks by
state, sharing, the prefix cache's device tier (which is the pool), preemptions by cause."""

from __future__ import annotations

import redis.asyncio
import torch

from prefix_store.entry import PrefixMeta, PrefixSpec
from prefix_store.meta import ResidentPrefix, TierUsage
from prefix_store.prefix_cache import PrefixCache
from prefix_store.redis_store import RedisPrefixStore
from server.engine.block_pool import BlockPool, BlockStats, ResidentBlocks
from server.engine.stats import EngineStats, PoolPrefixTier, StepStats
from server.metrics import Metrics

BLOCKS = BlockStats(
    16, 100, num_prefix_blocks=7, num_idle_prefix_blocks=3, num_row_blocks=20, num_free_blocks=73,
    num_resident_prefixes=3, num_prefix_refs=9, num_idle_prefixes=1, num_prefix_hits=40,
    num_prefix_placements=5, num_prefix_evictions=2,
    resident=(ResidentBlocks("old", 2, 40, 3, 0), ResidentBlocks("a", 1, 20, 2, 6),
              ResidentBlocks("b", 4, 17, 2, 3)),
)  # fmt: skip
BYTES_PER_BLOCK = 1024


def _stats() -> EngineStats:
    return EngineStats(9, 0, 256, 4096, True, 24 * BYTES_PER_BLOCK, 100 * BYTES_PER_BLOCK, BLOCKS)


def _prefixes(stats=_stats) -> PrefixCache:  # type: ignore[no-untyped-def]
    store = RedisPrefixStore(redis.asyncio.Redis(), "fp")  # never connects: only its counters are read
    spec = PrefixSpec(1, 1, 1, torch.float32, 1)
    return PrefixCache(store, spec, torch.device("cpu"), 0, device_tier=PoolPrefixTier(stats))


def test_block_metrics_and_vllm_cache_config() -> None:
    metrics = Metrics(vllm_names=True)
    metrics.bind(_stats, _prefixes())
    text = metrics.render().decode()
    for line in (
        'prefix_server_kv_blocks{state="prefix"} 4.0',
        'prefix_server_kv_blocks{state="cached_prefix"} 3.0',
        'prefix_server_kv_blocks{state="rows"} 20.0',
        'prefix_server_kv_blocks{state="free"} 73.0',
        "prefix_server_kv_block_size 16.0",
        "prefix_server_kv_resident_prefixes 3.0",
        "prefix_server_kv_prefix_refs 9.0",
        "prefix_server_kv_rows_per_prefix 4.5",  # 9 rows over the 2 prefixes read
        "prefix_server_kv_cache_usage_ratio 0.24",
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="100"} 1.0',
        "vllm:kv_cache_usage_perc 0.24",
        'running_lora_adapters="b,a,old"',  # resident in the pool, most recently used first
    ):
        assert line in text, line


def test_the_device_tier_figures_come_from_the_pool() -> None:
    metrics = Metrics()
    metrics.bind(_stats, _prefixes())
    text = metrics.render().decode()
    for line in (
        'prefix_server_prefix_cache_resident_bytes{tier="device"} 7168.0',  # 7 prefix blocks
        'prefix_server_prefix_cache_resident_prefixes{tier="device"} 3.0',
        'prefix_server_prefix_cache_capacity_bytes{tier="device"} 102400.0',  # the whole pool: one budget
        'prefix_server_prefix_cache_hits_total{tier="device"} 40.0',
        'prefix_server_prefix_cache_misses_total{tier="device"} 5.0',
        'prefix_server_prefix_cache_evictions_total{tier="device"} 2.0',
        'prefix_server_prefix_cache_capacity_bytes{tier="host"} 0.0',
    ):
        assert line in text, line


def test_admin_cache_view_of_the_device_tier_is_the_pool() -> None:
    pool = BlockPool(num_blocks=11, block_size=16)
    meta = PrefixMeta("acme:t", 3, 20, 0, "float32", "fp", "now")
    assert pool.admit("r", meta, torch.empty(0), prefix_len=20, num_positions=1)

    def stats() -> EngineStats:
        return EngineStats(1, 0, 4, 64, True, 0, 10 * BYTES_PER_BLOCK, pool.stats())

    prefixes = _prefixes(stats)
    assert prefixes.usage()["device"] == TierUsage(10 * BYTES_PER_BLOCK, 2 * BYTES_PER_BLOCK, 1)
    assert prefixes.resident() == [ResidentPrefix("device", "acme:t", 3, 20, 2 * BYTES_PER_BLOCK, True)]
    pool.free("r")
    assert [r.is_pinned for r in prefixes.resident()] == [False]  # resident, evictable


def test_preemptions_are_counted_by_cause() -> None:
    metrics = Metrics()
    assert 'prefix_server_preemptions_total{cause="blocks"} 0.0' in metrics.render().decode()
    metrics.observe_step(StepStats(0, 0, 0, 0.0, (), num_preempted_for_blocks=2))
    metrics.observe_step(
        StepStats(3, 1, 3, 0.01, (), num_preempted_for_blocks=1, num_preempted_for_fairness=4)
    )
    text = metrics.render().decode()
    assert 'prefix_server_preemptions_total{cause="blocks"} 3.0' in text
    assert 'prefix_server_preemptions_total{cause="fairness"} 4.0' in text
