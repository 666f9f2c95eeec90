"""The vLLM metric names the Kubernetes Gateway API Inference Extension's endpoint picker reads.

Registered by `Metrics` only with `--metrics-vllm-names`; `docs/metrics.md` documents them.
"""

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.stats import EngineStats

if TYPE_CHECKING:  # torch-free at run time: the HTTP layer imports the metrics
    from prefix_store.prefix_cache import PrefixCache


def kv_usage_ratio(stats: EngineStats) -> float:
    """KV pool blocks that running rows need (their own and their prefixes') over all, 0..1."""
    if stats.kv_capacity_bytes <= 0:
        return 0.0
    return min(1.0, stats.kv_used_bytes / stats.kv_capacity_bytes)


class VllmCollector(Collector):
    """The vLLM metric names the Gateway API Inference Extension's endpoint picker scrapes.

    Task prefixes play the part of LoRA adapters: `running_lora_adapters` lists the tasks
    resident in the KV pool (served with no load, most recently used first) and
    `waiting_lora_adapters` the tasks being loaded from Redis right now; `max_lora` is the KV
    slot count (the most distinct tasks one batch can hold). Each list has at most
    `max_tasks` ids, and none at all while per-task labels are off (`per_task()` false).
    """

    def __init__(
        self,
        engine_stats: Callable[[], EngineStats],
        prefixes: "PrefixCache",
        max_tasks: int,
        per_task: Callable[[], bool],
    ) -> None:
        self._engine_stats = engine_stats
        self._prefixes = prefixes
        self._max_tasks = max_tasks
        self._per_task = per_task

    def collect(self) -> Iterator[Metric]:
        stats = self._engine_stats()
        yield GaugeMetricFamily("vllm:num_requests_running", "Rows being decoded", stats.num_running)
        yield GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting for a KV slot", stats.num_waiting
        )
        usage = kv_usage_ratio(stats)
        yield GaugeMetricFamily("vllm:gpu_cache_usage_perc", "KV cache usage, 0..1", usage)
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage, 0..1", usage)
        yield self._lora_info(stats)
        # what the Gateway API inference extension reads
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "KV cache configuration", labels=["block_size", "num_gpu_blocks"]
        )
        info.add_metric([str(stats.blocks.block_size), str(stats.blocks.num_blocks)], 1.0)
        yield info

    def _lora_info(self, stats: EngineStats) -> Metric:
        running: list[str] = []
        waiting: list[str] = []
        if self._per_task():
            device = list(dict.fromkeys(r.task_id for r in reversed(stats.blocks.resident)))
            running = device[: self._max_tasks]
            loading = self._prefixes.loading_task_ids
            waiting = [t for t in loading if t not in running][: self._max_tasks]
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Resident (running) and loading (waiting) task prefixes; value: scrape time",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        # the endpoint picker keeps the series with the largest value, vLLM's is a timestamp
        family.add_metric([",".join(running), ",".join(waiting), str(stats.num_slots)], time.time())
        return family
