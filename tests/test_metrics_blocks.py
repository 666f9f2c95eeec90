"""The paged pool's metrics as `/metrics` renders them, from an engine stats record."""

from __future__ import annotations

import redis.asyncio
import torch

from prefix_store.entry import PrefixSpec
from prefix_store.prefix_cache import PrefixCache
from prefix_store.redis_store import RedisPrefixStore
from server.engine.block_pool import BlockStats
from server.engine.stats import EngineStats
from server.metrics import Metrics


def test_block_metrics_and_vllm_cache_config() -> None:
    metrics = Metrics(vllm_names=True)
    store = RedisPrefixStore(redis.asyncio.Redis(), "fp")  # never connects: only its counters are read
    prefixes = PrefixCache(store, PrefixSpec(1, 1, 1, torch.float32, 1), torch.device("cpu"), 0, 0)
    blocks = BlockStats(16, 100, num_prefix_blocks=7, num_idle_prefix_blocks=3, num_row_blocks=20,
                        num_free_blocks=73, num_resident_prefixes=2, num_prefix_refs=9)  # fmt: skip
    metrics.bind(lambda: EngineStats(9, 0, 256, 4096, True, 24 * 16, 100 * 16, blocks), prefixes)
    text = metrics.render().decode()
    for line in (
        'prefix_server_kv_blocks{state="prefix"} 4.0',
        'prefix_server_kv_blocks{state="cached_prefix"} 3.0',
        'prefix_server_kv_blocks{state="rows"} 20.0',
        'prefix_server_kv_blocks{state="free"} 73.0',
        "prefix_server_kv_block_size 16.0",
        "prefix_server_kv_resident_prefixes 2.0",
        "prefix_server_kv_prefix_refs 9.0",
        "prefix_server_kv_cache_usage_ratio 0.24",
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="100"} 1.0',
        "vllm:kv_cache_usage_perc 0.24",
    ):
        assert line in text, line
