"""Every Prometheus collector, fed from the engine's and the prefix cache's stats objects.

`docs/metrics.md` documents each one. Labels are bounded: endpoints are route templates,
tiers and finish reasons are fixed sets, and per-task series exist only for the first
`max_task_labels` tasks seen (the rest count under `task="other"`). Task ids tell who the
tenants are and what they do, so per-task labels are off once API keys exist, unless the
operator opts in (`per_task="on"`): then every task counts under `task="other"`.
"""

import secrets
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.stats import EngineStats, FinishedRequest, StepStats
from server.metrics.pool import device_tier_stats, pool_metrics
from server.metrics.redis_health import RedisHealthCollector
from server.metrics.vllm_names import VllmCollector

if TYPE_CHECKING:  # torch-free at run time: the HTTP layer imports this module
    from prefix_store.prefix_cache import PrefixCache

# LLM serving spans milliseconds (a decode step) to minutes (a long generation)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OTHER_TASKS = "other"


class TaskLabels:
    """Gives the first `max_tasks` task ids their own label value; every later one is `other`."""

    def __init__(self, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def known(self) -> list[str]:
        with self._lock:
            return sorted(self._known)

    def forget(self) -> list[str]:
        """Drop every task's own label (per-task labels were turned off); the ids that had one."""
        with self._lock:
            known, self._known = sorted(self._known), set()
            return known

    def __call__(self, task_id: str) -> str:
        with self._lock:
            if task_id in self._known:
                return task_id
            if len(self._known) < self.max_tasks:
                self._known.add(task_id)
                return task_id
        return OTHER_TASKS


class _LiveCollector(Collector):
    """Gauges and counters read from stats objects at scrape time."""

    def __init__(
        self,
        engine_stats: Callable[[], EngineStats],
        prefixes: "PrefixCache",
        task_labels: TaskLabels,
        other_redis_errors: Callable[[], int],
    ) -> None:
        self._engine_stats = engine_stats
        self._prefixes = prefixes
        self._task_labels = task_labels
        self._other_redis_errors = other_redis_errors

    def collect(self) -> Iterator[Metric]:
        stats = self._engine_stats()
        prefixes = self._prefixes
        yield GaugeMetricFamily(
            "prefix_server_running_requests", "Rows being decoded", value=stats.num_running
        )
        yield GaugeMetricFamily(
            "prefix_server_waiting_requests", "Requests waiting for a KV slot", stats.num_waiting
        )
        yield GaugeMetricFamily(
            "prefix_server_loading_requests",
            "Requests waiting for their prefix from Redis",
            prefixes.num_loading,
        )
        yield from pool_metrics(stats)
        yield from self._tier_metrics(stats)
        yield CounterMetricFamily(
            "prefix_server_prefix_loads", "Prefix loads from Redis", prefixes.load_stats.loads
        )
        yield CounterMetricFamily(
            "prefix_server_prefix_invalidations",
            "Resident prefixes dropped as stale",
            prefixes.load_stats.stale_dropped,
        )
        yield CounterMetricFamily(
            "prefix_server_redis_errors",
            "Failed Redis calls",
            prefixes.store.num_errors + self._other_redis_errors(),
        )
        yield self._task_residency(stats)

    def _task_residency(self, stats: EngineStats) -> Metric:
        """1 where a labelled task's prefix is resident in a tier (only the bounded set of tasks)."""
        family = GaugeMetricFamily(
            "prefix_server_task_prefix_resident",
            "Task prefix resident in a tier (1) or not (0)",
            labels=["task", "tier"],
        )
        on_device = {r.task_id for r in stats.blocks.resident}
        for task_id in self._task_labels.known():
            family.add_metric([task_id, "device"], float(task_id in on_device))
            for tier in self._prefixes.tiers:
                family.add_metric([task_id, tier.name], float(tier.peek(task_id) is not None))
        return family

    def _tier_metrics(self, stats: EngineStats) -> Iterator[Metric]:
        """Per tier: the device tier is the KV pool (its prefix blocks, the whole pool as budget)."""
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
        device = device_tier_stats(stats)
        for field, family in families.items():
            family.add_metric(["device"], device[field])
            for tier in self._prefixes.tiers:
                family.add_metric([tier.name], getattr(tier.stats, field))
        capacity = GaugeMetricFamily(
            "prefix_server_prefix_cache_capacity_bytes", "Tier budget", labels=["tier"]
        )
        capacity.add_metric(["device"], stats.kv_capacity_bytes)
        for tier in self._prefixes.tiers:
            capacity.add_metric([tier.name], tier.capacity_bytes)
        yield from families.values()
        yield capacity


PerTask = Literal["auto", "on", "off"]


class Metrics:
    """One registry per app, so several apps (tests) never collide.

    `per_task`: task-id labels "on", "off", or "auto" (on until API keys exist, see `bind`).
    `token`: when set, `/metrics` needs `Authorization: Bearer <token>` (`is_allowed`); unset, it
    is open until API keys exist, then closed.
    `vllm_names`: also export the vLLM names the Gateway API Inference Extension scrapes.
    """

    def __init__(
        self,
        max_task_labels: int = 20,
        per_task: PerTask = "auto",
        token: str | None = None,
        vllm_names: bool = False,
    ) -> None:
        self.registry = registry = CollectorRegistry()
        self.vllm_names = vllm_names
        self.task_label = TaskLabels(max_task_labels)
        self.per_task: PerTask = per_task
        self.token = token
        self._has_keys: Callable[[], bool] = lambda: False
        self._fold_lock = threading.Lock()
        self._declare_latencies()
        self._declare_counts()
        self.model_info = Info("prefix_server_model", "The served model", registry=registry)

    def _declare_latencies(self) -> None:
        """The histograms: request, token, queue, step and prefix-load latencies, batch sizes."""
        self.request_duration = self._histogram(
            "prefix_server_request_duration_seconds",
            "HTTP request latency, end to end",
            _LATENCY_BUCKETS,
            ["endpoint"],
        )
        self.ttft = self._histogram(
            "prefix_server_time_to_first_token_seconds",
            "Request arrival to first generated token",
            _LATENCY_BUCKETS,
        )
        self.tpot = self._histogram(
            "prefix_server_time_per_output_token_seconds",
            "Mean time per output token after the first",
            _TOKEN_BUCKETS,
        )
        self.queue_wait = self._histogram(
            "prefix_server_queue_wait_seconds", "Submitted to admitted into a KV slot", _LATENCY_BUCKETS
        )
        self.generation_duration = self._histogram(
            "prefix_server_generation_duration_seconds",
            "Submitted to last token, per generation",
            _LATENCY_BUCKETS,
        )
        self.batch_size = self._histogram("prefix_server_batch_size", "Rows per engine step", _BATCH_BUCKETS)
        self.step_duration = self._histogram(
            "prefix_server_engine_step_seconds", "Engine step latency", _TOKEN_BUCKETS
        )
        self.prefix_load = self._histogram(
            "prefix_server_prefix_load_seconds",
            "Prefix load from Redis to the device (cold miss)",
            _LOAD_BUCKETS,
        )

    def _declare_counts(self) -> None:
        """The counters: requests, tokens, endings, per-task traffic, preemptions."""
        registry = self.registry
        self.requests = Counter(
            "prefix_server_requests", "HTTP requests", ["endpoint", "status"], registry=registry
        )
        self.generated_tokens = Counter(
            "prefix_server_generated_tokens", "Tokens generated", registry=registry
        )
        self.prompt_tokens = Counter(
            "prefix_server_prompt_tokens", "Prompt tokens prefilled", registry=registry
        )
        self.finished = Counter(
            "prefix_server_finished_requests", "Generations ended, by reason", ["reason"], registry=registry
        )
        self.task_requests = Counter(
            "prefix_server_task_requests",
            "Generations per task (bounded labels)",
            ["task"],
            registry=registry,
        )
        self.task_tokens = Counter(
            "prefix_server_task_generated_tokens",
            "Generated tokens per task (bounded labels)",
            ["task"],
            registry=registry,
        )
        self.preemptions = Counter(
            "prefix_server_preemptions",
            "Running rows sent back to the queue (recomputed later), by cause",
            ["cause"],
            registry=registry,
        )
        for cause in ("blocks", "fairness"):
            self.preemptions.labels(cause=cause)  # both series from the start

    def _histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: list[str] | None = None
    ) -> Histogram:
        return Histogram(name, doc, labels or [], buckets=buckets, registry=self.registry)

    def bind(
        self,
        engine_stats: Callable[[], EngineStats],
        prefixes: "PrefixCache",
        other_redis_errors: Callable[[], int] = lambda: 0,
        has_keys: Callable[[], bool] = lambda: False,
    ) -> None:
        """Read engine and store state at scrape time; `other_redis_errors`: failed Redis calls of
        the key store and the rate limiter; `has_keys`: whether API keys exist (for `per_task="auto"`)."""
        self._has_keys = has_keys
        self.registry.register(_LiveCollector(engine_stats, prefixes, self.task_label, other_redis_errors))
        store = prefixes.store
        self.registry.register(RedisHealthCollector(store.health, lambda: store.num_not_replicated))
        if self.vllm_names:
            max_tasks = self.task_label.max_tasks
            self.registry.register(VllmCollector(engine_stats, prefixes, max_tasks, self.is_per_task))

    def is_per_task(self) -> bool:
        """Whether task ids get their own label now."""
        return self.per_task == "on" or (self.per_task == "auto" and not self._has_keys())

    def is_allowed(self, bearer: str | None) -> bool:
        """Whether a scrape with this bearer token may read `/metrics`: with a token set, only with
        it; without one, only while no API key exists (tenants' traffic is not for anyone to read)."""
        if self.token is None:
            return not self._has_keys()
        return bearer is not None and secrets.compare_digest(bearer.encode(), self.token.encode())

    def _fold_task_labels(self) -> None:
        """Per-task labels just turned off: every labelled task's counts move under `other`
        (the totals stay monotonic) and its series disappear from the next scrape on."""
        with self._fold_lock:
            for task in self.task_label.forget():
                for counter in (self.task_requests, self.task_tokens):
                    counter.labels(task=OTHER_TASKS).inc(_task_count(counter, task))
                    counter.remove(task)

    def observe_step(self, stats: StepStats) -> None:
        """Called by the engine thread after each step."""
        for request in stats.finished:
            self._observe_finished(request)
        if stats.num_preempted_for_blocks:
            self.preemptions.labels(cause="blocks").inc(stats.num_preempted_for_blocks)
        if stats.num_preempted_for_fairness:
            self.preemptions.labels(cause="fairness").inc(stats.num_preempted_for_fairness)
        if stats.num_decode_rows + stats.num_prefill_rows == 0:
            return
        self.batch_size.observe(stats.num_decode_rows + stats.num_prefill_rows)
        self.generated_tokens.inc(stats.num_new_tokens)
        self.step_duration.observe(stats.duration_s)

    def _observe_finished(self, request: FinishedRequest) -> None:
        self.finished.labels(reason=request.finish_reason).inc()  # bounded: a FinishReason
        task = self.task_label(request.task_id) if self.is_per_task() else OTHER_TASKS
        self.task_requests.labels(task=task).inc()
        self.task_tokens.labels(task=task).inc(request.num_output_tokens)
        if request.queue_wait_s is not None:
            self.prompt_tokens.inc(request.num_prompt_tokens)
            self.queue_wait.observe(request.queue_wait_s)
        if request.tpot_s is not None:
            self.tpot.observe(request.tpot_s)
        if request.finish_reason in ("length", "stop", "eos"):
            self.generation_duration.observe(request.duration_s)

    def observe_request(self, endpoint: str, status: int, duration_s: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.request_duration.labels(endpoint=endpoint).observe(duration_s)

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        if not self.is_per_task() and self.task_label.known():
            self._fold_task_labels()
        return generate_latest(self.registry)


def _task_count(counter: Counter, task: str) -> float:
    """One task's count, read through the counter's public `collect()` (no getter for one child)."""
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == {"task": task}:
                return sample.value
    return 0.0
