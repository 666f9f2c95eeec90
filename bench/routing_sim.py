"""Routing policies at scale, simulated: cold prefix loads and load skew over many replicas.

Policies: random, round-robin, consistent hashing (a ring of virtual points per replica) and
consistent hashing with bounded loads (the same ring; a replica takes a request only while it
serves fewer than its share of ceil(factor x (in flight + 1)) requests, as HAProxy's
`hash-balance-factor` computes it, else the next replica clockwise takes it).

Model: one request arrives per tick and stays in flight for `duration` ticks (so about
`duration` requests are in flight; the sweep uses `--in-flight` per replica); its task is drawn
from Zipf(s) over `num_tasks`; each replica keeps an LRU of `cache_size` prefixes, and a request
whose task is not resident is a cold load.

    python bench/routing_sim.py                      # a sweep, printed and plotted
    python bench/routing_sim.py --replicas 10 100 --tasks 100000 --requests 200000
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

POLICIES = ("random", "round-robin", "consistent", "bounded")


def stable_hash(text: str) -> int:
    """A 32-bit hash that does not change between runs (Python's `hash` of str does)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


class Ring:
    """Consistent-hash ring: `points` virtual points per replica; a key goes clockwise to the
    first point at or after its hash (wrapping around)."""

    def __init__(self, num_replicas: int, points: int = 100, hash_fn: Callable[[str], int] = stable_hash):
        pairs = sorted((hash_fn(f"replica-{r}-{p}"), r) for r in range(num_replicas) for p in range(points))
        self.positions = [pos for pos, _ in pairs]
        self.owners = [owner for _, owner in pairs]
        self.hash_fn = hash_fn

    def walk(self, key: str) -> Iterator[int]:
        """Replicas in the order a lookup for `key` tries them (each once), lazily."""
        start = bisect.bisect_left(self.positions, self.hash_fn(key)) % len(self.positions)
        seen: set[int] = set()
        for i in range(len(self.owners)):
            owner = self.owners[(start + i) % len(self.owners)]
            if owner not in seen:
                seen.add(owner)
                yield owner


def load_bound(replica: int, num_replicas: int, total_in_flight: int, factor_percent: int) -> int:
    """HAProxy's chash_server_is_eligible with equal weights: the replica's slots when
    `total_in_flight` requests are served and one more arrives."""
    total_slots = ((total_in_flight + 1) * factor_percent + 99) // 100
    per_replica, remainder = divmod(total_slots, num_replicas)
    slots = per_replica + ((replica + 1) * remainder) // num_replicas - (replica * remainder) // num_replicas
    return max(slots, 1)


@dataclass
class Result:
    """What one run measured."""

    policy: str
    num_requests: int
    cold_loads: int
    served: list[int]

    @property
    def cold_rate(self) -> float:
        return self.cold_loads / self.num_requests

    @property
    def max_over_mean(self) -> float:
        return max(self.served) / (sum(self.served) / len(self.served))


def simulate(
    policy: str,
    tasks: Sequence[str],
    num_replicas: int,
    cache_size: int,
    duration: int = 1,
    factor_percent: int = 125,
    ring: Ring | None = None,
    seed: int = 0,
) -> Result:
    """Route `tasks` (one request per tick) and count cold loads and requests per replica."""
    rng = random.Random(seed)
    ring = ring or Ring(num_replicas)
    caches: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(num_replicas)]
    in_flight = [0] * num_replicas
    ending: deque[tuple[int, int]] = deque()  # (tick it ends, replica)
    served = [0] * num_replicas
    cold = 0
    for tick, task in enumerate(tasks):
        while ending and ending[0][0] <= tick:
            in_flight[ending.popleft()[1]] -= 1
        replica = _choose(policy, task, tick, num_replicas, in_flight, factor_percent, ring, rng)
        cache = caches[replica]
        if task in cache:
            cache.move_to_end(task)
        else:
            cold += 1
            cache[task] = None
            if len(cache) > cache_size:
                cache.popitem(last=False)
        served[replica] += 1
        in_flight[replica] += 1
        ending.append((tick + duration, replica))
    return Result(policy, len(tasks), cold, served)


def _choose(
    policy: str,
    task: str,
    tick: int,
    num_replicas: int,
    in_flight: list[int],
    factor_percent: int,
    ring: Ring,
    rng: random.Random,
) -> int:
    if policy == "random":
        return rng.randrange(num_replicas)
    if policy == "round-robin":
        return tick % num_replicas
    if policy == "consistent":
        return next(ring.walk(task))
    if policy != "bounded":
        raise ValueError(f"unknown policy {policy!r}")
    total = sum(in_flight)
    for replica in ring.walk(task):
        if in_flight[replica] < load_bound(replica, num_replicas, total, factor_percent):
            return replica
    raise AssertionError("every replica is at its bound: impossible with a factor >= 100")


def zipf_tasks(num_tasks: int, num_requests: int, s: float, seed: int = 0) -> list[str]:
    """`num_requests` task ids, task k drawn with probability proportional to 1 / k^s."""
    weights = 1.0 / np.arange(1, num_tasks + 1) ** s
    rng = np.random.default_rng(seed)
    draws = rng.choice(num_tasks, size=num_requests, p=weights / weights.sum())
    return [f"task-{k}" for k in draws]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--tasks", type=int, default=30000)
    parser.add_argument("--requests", type=int, default=100000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument(
        "--cache-fraction", type=float, default=1 / 3, help="cache per replica / (tasks / replicas)"
    )
    parser.add_argument("--in-flight", type=int, default=10, help="requests in flight per replica (batch)")
    parser.add_argument("--png", type=Path, default=Path("bench/results/routing_sim.png"))
    args = parser.parse_args(argv)
    tasks = zipf_tasks(args.tasks, args.requests, args.zipf)
    rows: dict[str, list[Result]] = {policy: [] for policy in POLICIES}
    print(f"{args.tasks} tasks, {args.requests} requests, Zipf({args.zipf})")
    print(f"{'replicas':>8} {'policy':>12} {'cold loads':>10} {'cold rate':>9} {'max/mean':>8}")
    for n in args.replicas:
        cache_size = max(1, round(args.cache_fraction * args.tasks / n))
        ring = Ring(n)
        for policy in POLICIES:
            result = simulate(policy, tasks, n, cache_size, args.in_flight * n, ring=ring)
            rows[policy].append(result)
            cold, rate, skew = result.cold_loads, result.cold_rate, result.max_over_mean
            print(f"{n:>8} {policy:>12} {cold:>10} {rate:>9.3f} {skew:>8.2f}")
    _plot(args.replicas, rows, args.png)


def _plot(replicas: list[int], rows: dict[str, list[Result]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cold_axis, skew_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for policy, results in rows.items():
        cold_axis.plot(replicas, [r.cold_rate for r in results], marker="o", label=policy)
        skew_axis.plot(replicas, [r.max_over_mean for r in results], marker="o", label=policy)
    for axis, title in ((cold_axis, "cold-load rate"), (skew_axis, "max / mean requests per replica")):
        axis.set_xscale("log")
        axis.set_xlabel("replicas")
        axis.set_title(title)
        axis.legend()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
