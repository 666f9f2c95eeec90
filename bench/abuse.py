"""Hostile-tenant benchmark: what one tenant's (or an anonymous client's) attack does to another
tenant's latency, and what it leaves behind.

Starts its own `prefix-serve` (a tiny GPT-2 with a chat template, embedded Redis under a
temporary dir, `--request-timeout` 30 s), creates a victim and an attacker tenant with their
own scoped API keys (and a second attacker key limited to 0.1 request/s), then measures the
*victim's* 8-token greedy `/generate` (one request at a time, back to back, from another client
address than the attacks', so the per-client connection cap does not count it as the attacker)
with no attack and under each attack of `bench/abuse_attacks.py` (issue 12's five and issue
25's eleven, by name).

Per phase: victim requests answered (and refused or failed) against the baseline's, p50/p99
and their ratios to the baseline's; after the attack, seconds until running + waiting rows
are back to 0 (within the request timeout + 5 s) and the server's RSS growth over the phase.
Issue 25's targets, `within`: p99 <= 3x baseline, >= 95% of the baseline's requests, rows back
to 0. `--attacks a,b` runs a subset, `--seconds` sets the phase length.
Writes `bench/results/abuse.json` and the `abuse` section of docs/benchmarks.md (`--no-docs`: not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.abuse_attacks import ATTACKER, ATTACKS, VICTIM, Target  # noqa: E402
from bench.doc_sections import write_section  # noqa: E402
from server.engine.precision import describe, machine_info  # noqa: E402
from tests.server_process import ServerProcess, upload_adapter  # noqa: E402
from tests.tiny_models import save_adapter, save_tiny_model  # noqa: E402

MAX_LEN = 2048
VICTIM_ADDRESS = "127.0.0.2"  # loopback too (Linux routes all of 127/8 to lo)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


async def _victim(url: str, headers: dict[str, str], stop: asyncio.Event) -> tuple[list[float], int]:
    """Latencies of the victim's answered requests, and how many were refused or failed."""
    body = {"task_id": VICTIM, "input_ids": [5, 6, 7], "max_new_tokens": 8, "ignore_eos": True}
    latencies, num_failed = [], 0
    # another client address than the attacks' (127.0.0.1): a victim is not the attacker's host, and
    # the per-client connection cap would otherwise count its connections with the attacker's
    transport = httpx.AsyncHTTPTransport(local_address=VICTIM_ADDRESS)
    async with httpx.AsyncClient(timeout=120, transport=transport) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                answer = await client.post(url + "/generate", json=body, headers=headers)
                is_ok = answer.status_code == 200
            except httpx.HTTPError:
                is_ok = False
            if is_ok:
                latencies.append(time.perf_counter() - started)
            else:  # a refused victim request is a lost one, not a fast one
                num_failed += 1
                await asyncio.sleep(0.05)
    return latencies, num_failed


METRICS_TOKEN = "abuse-bench-metrics"  # keys exist: /metrics answers this bearer only


def _metrics(target: Target) -> dict[str, float]:
    """The unlabelled samples of `/metrics`."""
    scrape = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    text = httpx.get(target.url + "/metrics", headers=scrape, timeout=30).text
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            values[parts[0]] = float(parts[1])
    return values


def _rows(target: Target) -> float:
    found = _metrics(target)
    return found.get("prefix_server_running_requests", 0.0) + found.get("prefix_server_waiting_requests", 0.0)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _attack_process(name: str, target: Target, seconds: float) -> None:
    """One attack for `seconds`, in its own process: its client work must not slow the victim's
    client (both would otherwise share one event loop and one GIL)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        await ATTACKS[name](target, stop)

    asyncio.run(run())


async def _drain_seconds(target: Target, limit_s: float) -> float | None:
    """Seconds until running + waiting rows are back to 0 (None: not within `limit_s`)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if await asyncio.to_thread(_rows, target) == 0:
            return round(time.monotonic() - started, 2)
        await asyncio.sleep(0.25)
    return None


async def _phase(
    target: Target, victim: dict[str, str], attack: str | None, seconds: float, pid: int, drain_s: float
) -> dict[str, Any]:
    stop = asyncio.Event()
    rss_before = _rss_bytes(pid)
    attacker = None
    if attack is not None:
        attacker = multiprocessing.get_context("spawn").Process(
            target=_attack_process, args=(attack, target, seconds + 1.0)
        )
        attacker.start()
        await asyncio.sleep(1.0)  # let the attack build up first
    measuring = asyncio.ensure_future(_victim(target.url, victim, stop))
    await asyncio.sleep(seconds)
    stop.set()
    latencies, num_failed = await measuring
    if attacker is not None:
        await asyncio.to_thread(attacker.join, 600)
    drained = await _drain_seconds(target, drain_s)
    return {
        "num_requests": len(latencies),
        "num_failed": num_failed,
        "p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(1000 * _percentile(latencies, 0.99), 2) if latencies else None,
        "rows_drained_s": drained,
        "rows_left": 0.0 if drained is not None else _rows(target),
        "rss_growth_pct": round(100 * (_rss_bytes(pid) - rss_before) / max(1, rss_before), 2),
    }


def _setup(workdir: Path, request_timeout_s: float) -> tuple[ServerProcess, Target, dict[str, str]]:
    model_dir = save_tiny_model("gpt2", workdir / "model", max_positions=MAX_LEN)
    adapter = save_adapter(model_dir, workdir / "adapter", num_virtual_tokens=8, seed=0)
    template = workdir / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    flags = ["--model", str(model_dir), "--log-level", "warning", "--chat-template", str(template)]
    flags += ["--request-timeout", str(request_timeout_s), "--metrics-token", METRICS_TOKEN]
    server = ServerProcess(workdir / "data", *flags).start()
    weights = (adapter.path / "adapter_model.safetensors").read_bytes()
    config = (adapter.path / "adapter_config.json").read_bytes()
    headers = {}
    keys = (("victim", VICTIM, 0.0), ("attacker", ATTACKER, 0.0), ("limited", ATTACKER, 0.1))
    with httpx.Client(timeout=60) as client:
        for name, task, requests_per_second in keys:
            if name != "limited":
                assert upload_adapter(client, server, task, weights, config).status_code == 201
            made = client.post(
                server.url + "/admin/keys", headers=server.admin_headers,
                json={"name": name, "scopes": [task.split(":")[0] + ":*"],
                      "requests_per_second": requests_per_second},
            )  # fmt: skip
            made.raise_for_status()
            headers[name] = {"Authorization": f"Bearer {made.json()['key']}"}
    target = Target(server.url, headers["attacker"], headers["limited"], server.admin_headers, MAX_LEN)
    return server, target, headers["victim"]


def _ratio(row: dict[str, Any], base: dict[str, Any], key: str) -> str:
    return f"{row[key] / base[key]:.2f}" if row.get(key) and base.get(key) else "-"


def _markdown(result: dict[str, Any]) -> str:
    rows = [
        "## Hostile tenants (`bench/abuse.py`)",
        "",
        f"One run, {result['date']}, on {describe(result['machine'])}.",
        f"Victim: one tenant's 8-token greedy `/generate`, back to back, {result['seconds']} s per phase,",
        f"from {VICTIM_ADDRESS} while the other tenant (or nobody with a key) attacks from 127.0.0.1",
        "(attacks in `bench/abuse_attacks.py`; the attacker's client runs on the same CPUs).",
        "Ratios are against the no-attack phase of the same run. After each attack: seconds until",
        "running + waiting rows were back to 0, and the server's RSS growth over the phase.",
        "",
        "| phase | victim requests (failed) | vs baseline | p50 ms | p99 ms | p50 ratio | p99 ratio "
        "| rows to 0 (s) | RSS growth % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = result["phases"]["no_attack"]
    for name, row in result["phases"].items():
        share = f"{row['num_requests'] / base['num_requests']:.2f}" if base["num_requests"] else "-"
        drained = (
            row["rows_drained_s"]
            if row["rows_drained_s"] is not None
            else f"no ({row['rows_left']:.0f} left)"
        )
        rows.append(
            f"| {name} | {row['num_requests']} ({row['num_failed']}) | {share} | {row['p50_ms']} "
            f"| {row['p99_ms']} | {_ratio(row, base, 'p50_ms')} | {_ratio(row, base, 'p99_ms')} "
            f"| {drained} | {row['rss_growth_pct']} |"
        )
    return "\n".join(rows)


def _is_within(row: dict[str, Any], base: dict[str, Any]) -> bool:
    """Issue 25's targets: p99 <= 3x baseline, >= 95% of the baseline's requests, rows back to 0."""
    if not row["p99_ms"] or not base["p99_ms"]:
        return False
    return (
        row["p99_ms"] <= 3 * base["p99_ms"]
        and row["num_requests"] >= 0.95 * base["num_requests"]
        and row["rows_drained_s"] is not None
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="victim measuring time per phase")
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), help=f"comma-separated subset of {','.join(ATTACKS)}"
    )
    parser.add_argument("--request-timeout", type=float, default=30.0, help="the server's --request-timeout")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "abuse.json")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    names = [name for name in args.attacks.split(",") if name]
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    with tempfile.TemporaryDirectory() as tmp:
        server, target, victim = _setup(Path(tmp), args.request_timeout)
        drain_s = args.request_timeout + 5.0
        try:
            phases = {
                "no_attack": asyncio.run(_phase(target, victim, None, args.seconds, server.pid, drain_s))
            }
            for name in names:
                phases[name] = asyncio.run(_phase(target, victim, name, args.seconds, server.pid, drain_s))
                print(name, phases[name], flush=True)
        finally:
            server.stop()
    base = phases["no_attack"]
    for name, row in phases.items():
        if name != "no_attack":
            row["within"] = _is_within(row, base)
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": args.seconds,
        "request_timeout_s": args.request_timeout,
        "phases": phases,
        "all_within": all(r.get("within", True) for r in phases.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_docs:
        write_section(ROOT / "docs" / "benchmarks.md", "abuse", _markdown(result))
    print(_markdown(result))
    return 0 if result["all_within"] else 1


if __name__ == "__main__":
    sys.exit(main())
