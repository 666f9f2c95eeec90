"""Every Prometheus collector, fed from the engine's and the prefix cache's stats objects."""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prefix_store.prefix_cache import PrefixCache
from server.engine.engine import EngineStats, StepStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _LiveCollector(Collector):
    """Gauges and counters read from stats objects at scrape time."""

    def __init__(self, engine_stats: Callable[[], EngineStats], prefixes: PrefixCache) -> None:
        self._engine_stats = engine_stats
        self._prefixes = prefixes

    def collect(self) -> Iterator[Metric]:
        stats = self._engine_stats()
        yield GaugeMetricFamily(
            "prefix_server_running_requests", "Rows being decoded", value=stats.num_running
        )
        yield GaugeMetricFamily(
            "prefix_server_waiting_requests", "Requests waiting for a slot", stats.num_waiting
        )
        yield GaugeMetricFamily(
            "prefix_server_kv_slots", "KV cache slots (max concurrent rows)", stats.num_slots
        )
        yield from self._tier_metrics()
        prefixes = self._prefixes
        yield CounterMetricFamily(
            "prefix_server_prefix_loads", "Prefix loads from Redis", prefixes.load_stats.loads
        )
        yield CounterMetricFamily(
            "prefix_server_prefix_invalidations",
            "Resident prefixes dropped as stale",
            prefixes.load_stats.stale_dropped,
        )
        yield CounterMetricFamily(
            "prefix_server_redis_errors", "Failed Redis calls", prefixes.store.num_errors
        )

    def _tier_metrics(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "hits": CounterMetricFamily(
                "prefix_server_prefix_cache_hits", "Prefix lookups hit", labels=["tier"]
            ),
            "misses": CounterMetricFamily(
                "prefix_server_prefix_cache_misses", "Prefix lookups missed", labels=["tier"]
            ),
            "evictions": CounterMetricFamily(
                "prefix_server_prefix_cache_evictions", "Prefixes evicted for space", labels=["tier"]
            ),
            "resident_bytes": GaugeMetricFamily(
                "prefix_server_prefix_cache_resident_bytes", "Bytes of resident prefixes", labels=["tier"]
            ),
            "resident_count": GaugeMetricFamily(
                "prefix_server_prefix_cache_resident_prefixes", "Resident prefixes", labels=["tier"]
            ),
        }
        for tier in self._prefixes.tiers:
            for field, family in families.items():
                family.add_metric([tier.name], getattr(tier.stats, field))
        yield from families.values()


class Metrics:
    """One registry per app, so several apps (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "prefix_server_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.request_duration = Histogram(
            "prefix_server_request_duration_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "prefix_server_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "prefix_server_batch_size", "Rows per engine step", buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.generated_tokens = Counter(
            "prefix_server_generated_tokens", "Tokens generated", registry=self.registry
        )
        self.prefix_load = Histogram(
            "prefix_server_prefix_load_seconds",
            "Prefix load from Redis to the device (cold miss)",
            buckets=_LOAD_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "prefix_server_finished_requests",
            "Generations ended, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.step_duration = Histogram(
            "prefix_server_engine_step_seconds",
            "Engine step latency",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def bind(self, engine_stats: Callable[[], EngineStats], prefixes: PrefixCache) -> None:
        self.registry.register(_LiveCollector(engine_stats, prefixes))

    def observe_step(self, stats: StepStats) -> None:
        for reason in stats.finish_reasons:  # bounded: length|stop|eos|abort|error
            self.finished.labels(reason=reason).inc()
        if stats.num_decode_rows + stats.num_prefill_rows == 0:
            return
        self.batch_size.observe(stats.num_decode_rows + stats.num_prefill_rows)
        self.generated_tokens.inc(stats.num_new_tokens)
        self.step_duration.observe(stats.duration_s)

    def observe_request(self, endpoint: str, status: int, duration_s: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.request_duration.labels(endpoint=endpoint).observe(duration_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
