"""The soak's result: the server once the traffic stopped, the verdict, and the table and markdown report."""

from __future__ import annotations

import asyncio
import datetime
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from bench.soak_checks import CANCELLED, LOST, OK, WRONG, Ctx, KindStats, Tally
from bench.soak_workload import MIX, Options
from server.engine.precision import machine_info
from tests.server_process import metric_value

GAUGES = (
    "prefix_server_running_requests",
    "prefix_server_waiting_requests",
    "prefix_server_loading_requests",
)
RSS_LIMIT_PCT = 5.0


# ---- after the run ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AfterRun:
    """The server once the traffic stopped."""

    gauges: dict[str, float]  # running/waiting/loading requests: all must be back to 0
    server_statuses: dict[str, int]  # `prefix_server_requests_total` summed by status, as the server saw it
    is_healthy: bool


METRICS_TOKEN = "soak-metrics-token"  # the server's --metrics-token (tenant keys exist: /metrics needs it)


async def after_run(http: httpx.AsyncClient, timeout_s: float = 15.0) -> AfterRun:
    """Polls the gauges until all are 0 (aborted rows leave within a step) or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    while True:
        text = (await http.get("/metrics", headers=auth)).text
        gauges = {name: metric_value(text, name) for name in GAUGES}
        if not any(gauges.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    is_healthy = (await http.get("/health")).status_code == 200
    return AfterRun(gauges, server_statuses(text), is_healthy)


def server_statuses(metrics_text: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for line in metrics_text.splitlines():
        if line.startswith("prefix_server_requests_total{") and 'status="' in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] += int(float(line.rsplit(" ", 1)[1]))
    return dict(sorted(counts.items()))


# ---- the result ---------------------------------------------------------------------------------
def rss_summary(samples: list[tuple[float, int, int]], warmup: float) -> dict[str, Any]:
    after = [s for s in samples if s[0] >= warmup] or samples[-1:]
    warm, final = after[0], samples[-1]
    peak = max(s[1] for s in after)
    return {
        "warmup_end_s": round(warm[0], 1),
        "warmup_end_mib": warm[1] / 1024,
        "max_mib": peak / 1024,
        "final_mib": final[1] / 1024,
        "growth_pct": 100 * (final[1] - warm[1]) / warm[1],
        "max_growth_pct": 100 * (peak - warm[1]) / warm[1],
        "redis_warmup_end_mib": warm[2] / 1024,
        "redis_final_mib": final[2] / 1024,
        "samples": [[round(t, 1), r, d] for t, r, d in samples],
    }


def percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(
    opts: Options,
    tally: Tally,
    traffic_s: float,
    rss: dict[str, Any],
    after: AfterRun,
    ctx: Ctx,
) -> dict[str, Any]:
    kinds = {kind: kind_row(stats) for kind, stats in sorted(tally.kinds.items())}
    totals = {k: sum(row[k] for row in kinds.values()) for k in ("requests", OK, CANCELLED, LOST, WRONG)}
    totals["status_5xx"] = sum(
        n
        for s in tally.kinds.values()
        for status, n in s.statuses.items()
        if status.isdigit() and int(status) >= 500
    )
    good = [t for kind, s in tally.kinds.items() if kind in GENERATION_KINDS for t in s.latencies_s]
    failures = failure_reasons(totals, rss, after)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": {**asdict(opts), "out": str(opts.out), "docs": str(opts.docs)},
        "traffic_s": traffic_s,
        "requests_per_s": totals["requests"] / traffic_s,
        "totals": totals,
        "good_generation_latency_ms": {"p50": percentile_ms(good, 0.5), "p99": percentile_ms(good, 0.99)},
        "distinct_answers_compared": len(ctx.refs),
        "kinds": kinds,
        "bad_cases": dict(sorted(ctx.bad_counts.items())),
        "uploads": {task: len(versions) for task, versions in sorted(ctx.versions.uploaded.items())},
        "rss": rss,
        "gauges_after": after.gauges,
        "healthy_after": after.is_healthy,
        "server_recorded_statuses": after.server_statuses,
        "problems": tally.problems,
        "passed": not failures,
        "failures": failures,
    }


GENERATION_KINDS = ("generate", "generate_stream", "generate_sampled", "completions", "completions_stream")


def kind_row(stats: KindStats) -> dict[str, Any]:
    return {
        "requests": stats.requests,
        **{k: stats.outcomes[k] for k in (OK, CANCELLED, LOST, WRONG)},
        "statuses": dict(sorted(stats.statuses.items())),
        "p50_ms": percentile_ms(stats.latencies_s, 0.5),
        "p99_ms": percentile_ms(stats.latencies_s, 0.99),
    }


def failure_reasons(totals: dict[str, int], rss: dict[str, Any], after: AfterRun) -> list[str]:
    reasons = [f"{totals[k]} {k}" for k in (LOST, WRONG, "status_5xx") if totals[k]]
    if rss["growth_pct"] >= RSS_LIMIT_PCT:  # the peak is reported, but a transient peak is no leak
        reasons.append(f"RSS grew {rss['growth_pct']:.1f}% after the warm-up")
    reasons += [f"{name} = {value:g} after the run" for name, value in after.gauges.items() if value]
    if not after.is_healthy:
        reasons.append("/health failed after the run")
    return reasons


def warnings_of(result: dict[str, Any]) -> list[str]:
    """What the server itself recorded that the clients could not see (not failures)."""
    found = []
    server_5xx = sum(n for status, n in result["server_recorded_statuses"].items() if int(status) >= 500)
    if server_5xx:
        found.append(
            f"the server's `prefix_server_requests_total` counts {server_5xx} 5xx answers "
            f"(clients saw {result['totals']['status_5xx']})"
        )
    log = result["server_log"]
    if log["num_error_lines"]:
        found.append(
            f"{log['num_error_lines']} ERROR lines in the server log (first in `server_log.first_error`)"
        )
    return found


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), **machine_info()}


# ---- output -----------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| kind | requests | ok | cancelled | lost | wrong | statuses | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for kind, row in result["kinds"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in row["statuses"].items())
        p50, p99 = (f"{v:.0f}" if v is not None else "-" for v in (row["p50_ms"], row["p99_ms"]))
        lines.append(
            f"| {kind} | {row['requests']} | {row[OK]} | {row[CANCELLED]} | {row[LOST]} | {row[WRONG]} "
            f"| {statuses} | {p50} | {p99} |"
        )
    t = result["totals"]
    counts = " | ".join(str(t[k]) for k in ("requests", OK, CANCELLED, LOST, WRONG))
    lines.append(f"| **total** | {counts} | 5xx: {t['status_5xx']} | | |")
    return lines


def summary_lines(result: dict[str, Any]) -> list[str]:
    rss, totals, lat, host = (
        result["rss"],
        result["totals"],
        result["good_generation_latency_ms"],
        result["machine"],
    )
    failures = f" ({'; '.join(result['failures'])})" if result["failures"] else ""
    gauges = ", ".join(f"`{k}` {v:g}" for k, v in result["gauges_after"].items())
    return [
        f"Verdict: **{'PASS' if result['passed'] else 'FAIL'}**{failures}",
        "",
        f"- {result['options']['clients']} clients for {result['traffic_s']:.0f} s on "
        f"{host['cpus']} CPUs ({host['platform']}, {host['cpu_capability']}, torch {host['torch']}): "
        f"{result['requests_per_s']:.1f} requests/s.",
        f"- Lost: {totals[LOST]}; mis-answered: {totals[WRONG]}; 5xx: {totals['status_5xx']}; "
        f"{result['distinct_answers_compared']} distinct (task, version, prompt, sampling) answers "
        "cross-checked.",
        f"- Good generations (the five generation kinds): p50 {lat['p50'] or 0:.0f} ms, "
        f"p99 {lat['p99'] or 0:.0f} ms end to end.",
        f"- Server RSS: {rss['warmup_end_mib']:.1f} MiB at the end of the warm-up ({rss['warmup_end_s']} s), "
        f"max {rss['max_mib']:.1f} MiB, final {rss['final_mib']:.1f} MiB: growth {rss['growth_pct']:+.2f}% "
        f"(max {rss['max_growth_pct']:+.2f}%; limit {RSS_LIMIT_PCT:.0f}%). Embedded Redis: "
        f"{rss['redis_warmup_end_mib']:.1f} -> {rss['redis_final_mib']:.1f} MiB.",
        f"- After the run: {gauges}; `/health` {'200' if result['healthy_after'] else 'failed'}.",
        *[f"- Warning: {w}." for w in result["warnings"]],
    ]


INTRO = """\
## Soak test

Produced by `.venv/bin/python bench/soak.py` (by hand, never in CI); JSON in
`bench/results/soak.json`. It starts its own server (a tiny GPT-2, its embedded Redis under a
temporary data dir), uploads 16 tasks (prefix lengths 1-96; canonical tensors, PEFT checkpoints
and text prefixes; three of them re-uploaded during the run) and drives mixed traffic over
loopback: greedy and seeded-sampling generations on `/generate` and `/v1/completions`, streamed
and not; cancellations (streams closed after 1-4 tokens, requests abandoned after 20-400 ms);
bad requests that must get their exact 4xx status and error code; admin uploads and reads.
Unless `--no-keys`, each of the 4 tenants has its own API key scoped to its tasks (`acme:*`, ...):
every generation carries its tenant's key, `/v1/models` must list exactly that tenant's tasks,
and the bad requests include a missing or wrong key (401) and another tenant's task (403).
Every answer to the same (task, prefix version, prompt, sampling) must be identical token for
token whichever endpoint served it, and every 200 must have the contract's shape. *Lost* =
neither a full answer nor a deliberate cancellation. RSS is the server process's `VmRSS`.
"""


def markdown(result: dict[str, Any]) -> str:
    opts = result["options"]
    flags = f"--duration {opts['duration']:g} --clients {opts['clients']} --warmup {opts['warmup']:g}"
    if not opts.get("use_keys", True):
        flags += " --no-keys"
    if opts["mix"] != MIX:
        flags += " --mix " + ",".join(f"{k}={v}" for k, v in opts["mix"].items())
    bad = ", ".join(f"{name} {n}" for name, n in result["bad_cases"].items())
    lines = [INTRO, f"Run of {result['date']}: `{flags}`.", "", *summary_lines(result), "", *table(result)]
    lines += ["", f"Bad requests by case (each must get its exact status and code): {bad}.", ""]
    if result["problems"]:
        lines += ["First problems:", "", *[f"- `{p}`" for p in result["problems"][:20]], ""]
    return "\n".join(lines)
