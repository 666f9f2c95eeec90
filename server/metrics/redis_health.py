"""Redis outage and recovery, as Prometheus metrics (read from `RedisHealth` at scrape time)."""

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prefix_store.health import RedisHealth


class RedisHealthCollector(Collector):
    """`prefix_server_redis_up` (1/0; on Cluster 1 only while every primary answers), outages
    started, the current outage's age and the last finished outage's duration."""

    def __init__(self, health: RedisHealth, num_not_replicated: Callable[[], int]) -> None:
        self._health = health
        self._num_not_replicated = num_not_replicated

    def collect(self) -> Iterator[Metric]:
        health = self._health
        yield GaugeMetricFamily(
            "prefix_server_redis_up", "Redis answered the last probe (1) or not (0)", float(health.is_up)
        )
        yield CounterMetricFamily(
            "prefix_server_redis_outages",
            "Redis outages seen (probes failing after a good one)",
            health.num_outages,
        )
        yield GaugeMetricFamily(
            "prefix_server_redis_outage_seconds",
            "Seconds into the Redis outage in progress (0 while up)",
            health.current_outage_s(),
        )
        yield GaugeMetricFamily(
            "prefix_server_redis_last_outage_seconds",
            "Duration of the last finished Redis outage (outage to recovery)",
            health.last_outage_s,
        )
        yield CounterMetricFamily(
            "prefix_server_uploads_not_replicated",
            "Uploads refused (503) because too few Redis replicas confirmed them in time",
            self._num_not_replicated(),
        )
