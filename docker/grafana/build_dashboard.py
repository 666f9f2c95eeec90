"""Writes `dashboards/prefix-server.json` from the panel list below (the source of truth).

Run `python docker/grafana/build_dashboard.py` after editing; a test checks the JSON is in sync
and a real Prometheus checks that every expression returns data.
"""

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "prefix-server.json"
RATE = "[$__rate_interval]"


def _q(quantile: float, metric: str, by: str = "") -> str:
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket{RATE})))"


# (row, title, unit, description, [(expr, legend)])
PANELS: list[tuple[str, str, str, str, list[tuple[str, str]]]] = [
    ("Traffic", "Requests / s by endpoint and status", "reqps", "HTTP requests per second.",
     [(f"sum by (endpoint, status) (rate(prefix_server_requests_total{RATE}))", "{{endpoint}} {{status}}")]),
    ("Traffic", "Errors / s by status", "reqps", "4xx and 5xx answers per second (see docs/metrics.md for codes).",
     [(f'sum by (status) (rate(prefix_server_requests_total{{status=~"4..|5.."}}{RATE}))', "{{status}}")]),
    ("Traffic", "Generations ended / s by reason", "reqps",
     "length / stop / eos are normal ends; abort = client left; error = engine failure.",
     [(f"sum by (reason) (rate(prefix_server_finished_requests_total{RATE}))", "{{reason}}")]),
    ("Traffic", "Tokens / s", "short", "Generated tokens and prefilled prompt tokens per second.",
     [(f"sum(rate(prefix_server_generated_tokens_total{RATE}))", "generated"),
      (f"sum(rate(prefix_server_prompt_tokens_total{RATE}))", "prompt")]),
    ("Latency", "End-to-end latency p50 / p99", "s", "HTTP request duration by endpoint (streams: until the last byte).",
     [(_q(0.5, "prefix_server_request_duration_seconds", "endpoint"), "p50 {{endpoint}}"),
      (_q(0.99, "prefix_server_request_duration_seconds", "endpoint"), "p99 {{endpoint}}")]),
    ("Latency", "Time to first token p50 / p99", "s", "Arrival (incl. a cold prefix load) to the first token.",
     [(_q(0.5, "prefix_server_time_to_first_token_seconds"), "p50"),
      (_q(0.99, "prefix_server_time_to_first_token_seconds"), "p99")]),
    ("Latency", "Time per output token p50 / p99", "s", "Mean gap between tokens after the first, per generation.",
     [(_q(0.5, "prefix_server_time_per_output_token_seconds"), "p50"),
      (_q(0.99, "prefix_server_time_per_output_token_seconds"), "p99")]),
    ("Latency", "Queue wait p50 / p99", "s", "Submitted to admitted into a KV slot; grows when slots are full.",
     [(_q(0.5, "prefix_server_queue_wait_seconds"), "p50"), (_q(0.99, "prefix_server_queue_wait_seconds"), "p99")]),
    ("Engine", "Batch occupancy (rows per step)", "short", "Rows decoded together; compare with KV slots.",
     [(f"sum(rate(prefix_server_batch_size_sum{RATE})) / sum(rate(prefix_server_batch_size_count{RATE}))", "mean"),
      (_q(0.99, "prefix_server_batch_size"), "p99"), ("sum(prefix_server_kv_slots)", "slots")]),
    ("Engine", "Engine step p50 / p99", "s", "One continuous-batching iteration (decode + any prefill).",
     [(_q(0.5, "prefix_server_engine_step_seconds"), "p50"), (_q(0.99, "prefix_server_engine_step_seconds"), "p99")]),
    ("Engine", "Requests running / waiting / loading", "short",
     "running: in a KV slot; waiting: for a slot; loading: for their prefix from Redis.",
     [("sum(prefix_server_running_requests)", "running"), ("sum(prefix_server_waiting_requests)", "waiting"),
      ("sum(prefix_server_loading_requests)", "loading")]),
    ("Engine", "KV memory", "bytes", "Pool memory running rows need (their blocks and their prefixes') vs the pool.",
     [("sum(prefix_server_kv_cache_used_bytes)", "used"), ("sum(prefix_server_kv_cache_capacity_bytes)", "capacity")]),
    ("KV pool", "KV pool blocks by state", "short",
     "prefix: prefixes rows read (one copy per task); cached_prefix: resident, unread, evicted LRU when rows "
     "need blocks; rows: rows' own tokens; free.",
     [("sum by (state) (prefix_server_kv_blocks)", "{{state}}")]),
    ("KV pool", "KV pool usage", "percentunit", "Blocks running rows need over the pool (cached prefixes count as free).",
     [("max(prefix_server_kv_cache_usage_ratio)", "usage")]),
    ("KV pool", "Rows per resident prefix", "short",
     "Rows reading each prefix copy that some row reads (sharing); resident prefixes (read or cached).",
     [("avg(prefix_server_kv_rows_per_prefix)", "rows per prefix"),
      ("sum(prefix_server_kv_resident_prefixes)", "resident prefixes")]),
    ("KV pool", "Preemptions / s by cause", "ops",
     "Rows sent back to the queue: blocks = the pool ran out (raise --kv-cache-bytes); fairness = another tenant's turn.",
     [(f"sum by (cause) (rate(prefix_server_preemptions_total{RATE}))", "{{cause}}")]),
    ("Prefix store", "Prefix cache hit ratio by tier", "percentunit",
     "device (the KV pool): admitted rows whose prefix was resident; host: lookups answered from host memory.",
     [(f"sum by (tier) (rate(prefix_server_prefix_cache_hits_total{RATE})) / (sum by (tier) "
       f"(rate(prefix_server_prefix_cache_hits_total{RATE})) + sum by (tier) "
       f"(rate(prefix_server_prefix_cache_misses_total{RATE})))", "{{tier}}")]),
    ("Prefix store", "Resident prefix bytes by tier", "bytes",
     "Bytes held per tier against its budget (device: prefix blocks against the whole KV pool).",
     [("sum by (tier) (prefix_server_prefix_cache_resident_bytes)", "{{tier}}"),
      ("sum by (tier) (prefix_server_prefix_cache_capacity_bytes)", "{{tier}} budget")]),
    ("Prefix store", "Loads, evictions, invalidations / s", "ops",
     "Redis loads (cold misses), evictions per tier, stale copies dropped (uploads seen from any replica).",
     [(f"sum(rate(prefix_server_prefix_loads_total{RATE}))", "loads"),
      (f"sum by (tier) (rate(prefix_server_prefix_cache_evictions_total{RATE}))", "evictions {{tier}}"),
      (f"sum(rate(prefix_server_prefix_invalidations_total{RATE}))", "invalidations")]),
    ("Prefix store", "Prefix load latency p50 / p99 and Redis errors", "s",
     "Redis to host memory per cold load; Redis errors per second (should be 0).",
     [(_q(0.5, "prefix_server_prefix_load_seconds"), "p50"), (_q(0.99, "prefix_server_prefix_load_seconds"), "p99"),
      (f"sum(rate(prefix_server_redis_errors_total{RATE}))", "redis errors / s")]),
    ("Tasks", "Hot tasks: generated tokens / s", "short", "Top 10 labelled tasks; unlabelled tasks count as `other`.",
     [(f"topk(10, sum by (task) (rate(prefix_server_task_generated_tokens_total{RATE})))", "{{task}}")]),
    ("Tasks", "Hot tasks: generations / s", "reqps", "Top 10 labelled tasks by finished generations.",
     [(f"topk(10, sum by (task) (rate(prefix_server_task_requests_total{RATE})))", "{{task}}")]),
    ("Tasks", "Labelled tasks resident on the device", "short", "1 when the task's prefix is in the KV pool.",
     [('max by (task) (prefix_server_task_prefix_resident{tier="device"})', "{{task}}")]),
    ("Tasks", "Model", "short", "The served model, device, dtype, fingerprint, context and KV slots.",
     [("max by (model, device, dtype, fingerprint, max_len, kv_slots) (prefix_server_model_info)", "{{model}} {{device}} {{dtype}}")]),
]  # fmt: skip


def _panel(index: int, row_y: int, col: int, title: str, unit: str, description: str, targets: list) -> dict:
    datasource = {"type": "prometheus", "uid": "prometheus"}
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": datasource,
        "gridPos": {"h": 8, "w": 12, "x": 12 * col, "y": row_y},
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"datasource": datasource, "refId": chr(65 + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def render() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, col, row = 0, 0, ""
    for index, (row_name, title, unit, description, targets) in enumerate(PANELS):
        if row_name != row:
            y += 0 if not panels else (8 if col else 0)
            panels.append(
                {
                    "id": 100 + len(panels),
                    "type": "row",
                    "title": row_name,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                }
            )
            y, col, row = y + 1, 0, row_name
        panels.append(_panel(index, y, col, title, unit, description, targets))
        y, col = (y, 1) if col == 0 else (y + 8, 0)
    return {
        "uid": "prefix-server",
        "title": "Prefix server",
        "tags": ["prefix-server"],
        "editable": True,
        "schemaVersion": 39,
        "version": 2,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "browser",
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard."""
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


if __name__ == "__main__":
    OUT.write_text(json.dumps(render(), indent=2) + "\n")
    print(f"wrote {OUT} ({len(expressions(render()))} expressions)")
