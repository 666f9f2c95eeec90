"""The paged KV pool's metrics: its memory, where its blocks are, how widely prefixes are shared,
and its figures as the prefix cache's device tier. `docs/metrics.md` documents each one."""

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from server.engine.stats import EngineStats
from server.metrics.vllm_names import kv_usage_ratio


def pool_metrics(stats: EngineStats) -> Iterator[Metric]:
    """The pool's memory and capacity, then its blocks (see `block_metrics`)."""
    yield GaugeMetricFamily("prefix_server_kv_slots", "KV cache slots (max concurrent rows)", stats.num_slots)
    yield GaugeMetricFamily(
        "prefix_server_kv_cache_used_bytes", "KV pool memory running rows need", stats.kv_used_bytes
    )
    yield GaugeMetricFamily(
        "prefix_server_kv_cache_capacity_bytes", "The KV pool: rows and prefixes", stats.kv_capacity_bytes
    )
    yield GaugeMetricFamily(
        "prefix_server_kv_cache_usage_ratio", "KV pool memory in use, 0..1", kv_usage_ratio(stats)
    )
    yield from block_metrics(stats)


def device_tier_stats(stats: EngineStats) -> dict[str, int]:
    """The device tier's figures, keyed like the host tier's `TierStats`: hits are rows whose
    prefix was resident, misses rows that copied theirs in, evictions LRU frees for room."""
    blocks = stats.blocks
    return {
        "hits": blocks.num_prefix_hits,
        "misses": blocks.num_prefix_placements,
        "evictions": blocks.num_prefix_evictions,
        "resident_bytes": blocks.num_prefix_blocks * stats.bytes_per_block,
        "resident_count": blocks.num_resident_prefixes,
    }


def block_metrics(stats: EngineStats) -> Iterator[Metric]:
    """Where the paged pool's blocks are, and how many rows read the resident prefixes."""
    blocks = stats.blocks
    family = GaugeMetricFamily("prefix_server_kv_blocks", "KV pool blocks by holder", labels=["state"])
    family.add_metric(["prefix"], blocks.num_prefix_blocks - blocks.num_idle_prefix_blocks)
    family.add_metric(["cached_prefix"], blocks.num_idle_prefix_blocks)
    family.add_metric(["rows"], blocks.num_row_blocks)
    family.add_metric(["free"], blocks.num_free_blocks)
    yield family
    yield GaugeMetricFamily("prefix_server_kv_block_size", "Positions per KV block", blocks.block_size)
    yield GaugeMetricFamily(
        "prefix_server_kv_resident_prefixes", "Prefixes held in the KV pool", blocks.num_resident_prefixes
    )
    yield GaugeMetricFamily(
        "prefix_server_kv_prefix_refs", "Running rows reading a shared prefix", blocks.num_prefix_refs
    )
    yield GaugeMetricFamily(
        "prefix_server_kv_rows_per_prefix",
        "Rows reading each resident prefix that some row reads, on average (sharing)",
        blocks.rows_per_prefix,
    )
