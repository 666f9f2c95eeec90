"""Routing on loopback: `prefix-cluster` with 3 replicas, Zipf traffic from concurrent clients.

Each mode starts its own cluster (fresh embedded Redis), uploads `--tasks` text prefixes
through HAProxy, then sends `--requests` generations whose tasks follow Zipf(s) from `--clients`
threads. Every replica's host prefix cache holds about a third of the tasks (`--cache-fraction`),
so a request whose prefix is not on its replica loads it from Redis:
`prefix_server_prefix_loads_total`, summed over replicas, counts the cold loads.

Modes: `hash` (bounded loads, factor 125; `hash150`, `hash200`: looser bounds), `plain`
(consistent hashing, factor off), `roundrobin`, and `kill` (`hash` with the busiest replica
SIGKILLed halfway through: what failed, which tasks moved). Cold loads are counted after a
warm-up half of the requests.

    python bench/cluster_bench.py                     # ~6 min on 2 cores (a tiny GPT-2)
    python bench/cluster_bench.py --modes hash roundrobin --requests 1000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "hash": ("hash", 125),
    "plain": ("hash", 0),
    "roundrobin": ("roundrobin", 125),
    "hash150": ("hash", 150),
    "hash200": ("hash", 200),
    "kill": ("hash", 125),
}


@dataclass
class Running:
    """A started `prefix-cluster`."""

    proc: subprocess.Popen[bytes]
    url: str
    replicas: dict[str, int]  # replica id (X-Replica) -> port
    token: str
    data_dir: Path


@dataclass
class Outcome:
    """One mode's numbers."""

    mode: str
    requests: int
    seconds: float
    cold_loads: int
    served: dict[str, int]
    hottest_task_replicas: dict[str, int]
    failures: dict[str, int] = field(default_factory=dict)
    warm_up_loads: int = 0
    moved_fraction: float | None = None
    killed_replica_share: float | None = None

    @property
    def max_over_mean(self) -> float:
        counts = list(self.served.values())
        return max(counts) / (sum(counts) / len(counts))


def start_cluster(mode: str, replicas: int, flags: list[str], root: Path) -> Running:
    balance, factor = MODES[mode]
    port = _free_port()
    data_dir = root / mode
    command = [sys.executable, "-m", "prefix_cluster", "--replicas", str(replicas), "--port", str(port)]
    command += ["--data-dir", str(data_dir), "--balance", balance, "--hash-balance-factor", str(factor)]
    log_path = root / f"{mode}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_") and k != "REDIS_URL"}
    with log_path.open("ab") as log:
        proc = subprocess.Popen([*command, "--", *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while "cluster ready:" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"cluster did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    ports = [int(p) for p in re.findall(r"replica r\d+ http://127\.0\.0\.1:(\d+)", log_path.read_text())]
    with httpx.Client() as client:
        ids = {client.get(f"http://127.0.0.1:{p}/health").headers["x-replica"]: p for p in ports}
    token = (data_dir / "admin_token").read_text().strip()
    return Running(proc, f"http://127.0.0.1:{port}", ids, token, data_dir)


def _free_port() -> int:
    from infra.embedded_redis import free_port

    return free_port()


def upload_tasks(cluster: Running, num_tasks: int) -> int:
    """Text prefixes of one length (so one cache size fits them all); returns bytes per prefix."""
    headers = {"Authorization": f"Bearer {cluster.token}"}
    num_bytes = 0
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        for i in range(num_tasks):
            files = {"text": (None, PREFIX_TEXT.format(i))}
            response = client.put(f"/admin/prefixes/bench:t{i}", files=files, headers=headers)
            response.raise_for_status()
            num_bytes = response.json()["num_bytes"]
    return num_bytes


def cold_loads(cluster: Running) -> int:
    """prefix_server_prefix_loads_total summed over the replicas still alive."""
    total = 0.0
    with httpx.Client(timeout=5) as client:
        for port in cluster.replicas.values():
            try:
                text = client.get(f"http://127.0.0.1:{port}/metrics").text
            except httpx.HTTPError:
                continue
            total += sum(
                float(m)
                for m in re.findall(r"^prefix_server_prefix_loads_total(?:\{[^}]*\})? (\S+)", text, re.M)
            )
    return int(total)


def send_traffic(
    cluster: Running, tasks: list[str], num_clients: int, kill_at: int | None
) -> tuple[list[tuple[str, str]], Counter[str], str | None]:
    """Send every request from `num_clients` threads; returns (task, replica) of each success
    in order, failures by kind and the killed replica (if `kill_at`)."""
    results: list[tuple[str, str]] = []
    failures: Counter[str] = Counter()
    lock, cursor = threading.Lock(), iter(range(len(tasks)))
    killed: list[str] = []

    def worker() -> None:
        with httpx.Client(base_url=cluster.url, timeout=30) as client:
            while True:
                with lock:
                    i = next(cursor, None)
                    if i is not None and i == kill_at:
                        killed.append(_kill_busiest(cluster, results))
                if i is None:
                    return
                body = {"task_id": tasks[i], "input_ids": [5, 6, 7], "max_new_tokens": 2, "ignore_eos": True}
                try:
                    response = client.post("/generate", json=body)
                except httpx.HTTPError as exc:
                    with lock:
                        failures[type(exc).__name__] += 1
                    continue
                with lock:
                    if response.status_code == 200:
                        results.append((tasks[i], response.headers["x-replica"]))
                    else:
                        failures[f"HTTP {response.status_code}"] += 1

    threads = [threading.Thread(target=worker) for _ in range(num_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, failures, killed[0] if killed else None


def _kill_busiest(cluster: Running, results: list[tuple[str, str]]) -> str:
    """SIGKILL the replica that served the most so far (found by its port)."""
    victim = Counter(replica for _, replica in results).most_common(1)[0][0]
    port = cluster.replicas[victim]
    pids = subprocess.run(["pgrep", "-f", "--", f"--port {port} "], capture_output=True, text=True).stdout
    for pid in pids.split():
        os.kill(int(pid), signal.SIGKILL)
    return victim


def home_of(results: list[tuple[str, str]]) -> dict[str, str]:
    """Each task's most frequent replica."""
    by_task: dict[str, Counter[str]] = defaultdict(Counter)
    for task, replica in results:
        by_task[task][replica] += 1
    return {task: counts.most_common(1)[0][0] for task, counts in by_task.items()}


def run_mode(mode: str, args: argparse.Namespace, tasks: list[str], root: Path) -> Outcome:
    """Warm-up half, then the measured half (cold loads after warm-up); mode `kill` is `hash`
    with a replica SIGKILLed halfway through the measured half."""
    # the host tier is what spares a Redis load (the device tier, the KV pool, copies from it)
    flags = ["--max-new-tokens", "16", "--host-cache-bytes", str(args.cache_bytes), *args.replica_flags]
    cluster = start_cluster(mode, args.replicas, flags, root)
    warm_up, measured = tasks[: len(tasks) // 2], tasks[len(tasks) // 2 :]
    try:
        per_prefix = upload_tasks(cluster, args.tasks)
        before = cold_loads(cluster)
        send_traffic(cluster, warm_up, args.clients, None)
        after_warm_up = cold_loads(cluster)
        kill_at = len(measured) // 2 if mode == "kill" else None
        started = time.monotonic()
        results, failures, victim = send_traffic(cluster, measured, args.clients, kill_at)
        seconds = time.monotonic() - started
        loads = cold_loads(cluster) - after_warm_up
    finally:
        cluster.proc.send_signal(signal.SIGTERM)
        cluster.proc.wait(120)
    served = Counter(replica for _, replica in results)
    hottest = Counter(replica for task, replica in results if task == tasks_by_rank(tasks)[0])
    outcome = Outcome(
        mode, len(measured), round(seconds, 1), loads, dict(served), dict(hottest), dict(failures)
    )
    outcome.warm_up_loads = after_warm_up - before
    if victim is not None:
        half = len(results) // 2
        before_kill = home_of(results[: half - args.clients])
        after_kill = home_of(results[half + args.clients :])
        common = [t for t in before_kill if t in after_kill]
        moved = [t for t in common if before_kill[t] != after_kill[t]]
        outcome.moved_fraction = round(len(moved) / max(1, len(common)), 3)
        on_victim = [t for t in common if before_kill[t] == victim]
        outcome.killed_replica_share = round(len(on_victim) / max(1, len(common)), 3)
    print(f"{mode}: prefix {per_prefix} bytes, {json.dumps(asdict(outcome))}", flush=True)
    return outcome


PREFIX_TEXT = "You are task number {:05d}."  # 26 bytes: 26 positions with a byte-level tokenizer


def prefix_bytes(model_dir: Path) -> int:
    """Bytes of one text prefix in float32: layers x (K, V) x heads x positions x head dim x 4."""
    config = json.loads((model_dir / "config.json").read_text())
    heads, width = config["n_head"], config["n_embd"]
    return config["n_layer"] * 2 * heads * len(PREFIX_TEXT.format(0)) * (width // heads) * 4


def tasks_by_rank(tasks: list[str]) -> list[str]:
    return [task for task, _ in Counter(tasks).most_common()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_modes = ["hash", "plain", "roundrobin", "kill"]
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=default_modes)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--requests", type=int, default=4000, help="half warm-up, half measured")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument(
        "--model", type=Path, default=None, help="byte-level model dir; default: a tiny GPT-2"
    )
    parser.add_argument(
        "--cache-fraction", type=float, default=1 / 3, help="of the tasks, per replica's cache"
    )
    parser.add_argument(
        "--cache-bytes", type=int, default=None, help="per replica; default: --cache-fraction"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster_bench.json")
    args, args.replica_flags = parser.parse_known_args(argv)
    weights = 1.0 / np.arange(1, args.tasks + 1) ** args.zipf
    draws = np.random.default_rng(0).choice(args.tasks, size=args.requests, p=weights / weights.sum())
    tasks = [f"bench:t{k}" for k in draws]
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        if args.model is None:
            sys.path.insert(0, str(ROOT))  # the tests' tiny model builder
            from tests.tiny_models import save_tiny_model

            args.model = save_tiny_model("gpt2", Path(tmp) / "model")
        args.replica_flags += ["--model", str(args.model)]
        if args.cache_bytes is None:
            args.cache_bytes = round(args.tasks * args.cache_fraction) * prefix_bytes(Path(args.model))
        outcomes = [run_mode(mode, args, tasks, Path(tmp)) for mode in args.modes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps([asdict(o) | {"max_over_mean": o.max_over_mean} for o in outcomes], indent=2)
    )
    print(
        f"{'mode':>10} {'warm-up loads':>13} {'cold loads':>10} {'max/mean':>8} {'hottest on':>10} failures"
    )
    for o in outcomes:
        spread, skew = len(o.hottest_task_replicas), o.max_over_mean
        print(f"{o.mode:>10} {o.warm_up_loads:>13} {o.cold_loads:>10} {skew:>8.2f} {spread:>10} {o.failures}")


if __name__ == "__main__":
    main()
