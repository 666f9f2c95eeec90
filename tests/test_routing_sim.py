"""bench/routing_sim.py against cases small enough to work out by hand."""

from __future__ import annotations

import pytest

from bench.routing_sim import Ring, load_bound, simulate, zipf_tasks


class FixedRing(Ring):
    """A ring whose lookups are given: task -> replicas in the order they are tried."""

    def __init__(self, order: dict[str, list[int]]) -> None:
        self.order = order

    def walk(self, key: str):  # type: ignore[no-untyped-def]
        yield from self.order[key]


def test_round_robin_loads_a_task_on_every_replica() -> None:
    # a a a a over 2 replicas (cache 1): r0 gets requests 0 and 2, r1 gets 1 and 3 -> 2 cold loads
    result = simulate("round-robin", ["a"] * 4, num_replicas=2, cache_size=1)
    assert (result.cold_loads, result.served, result.max_over_mean) == (2, [2, 2], 1.0)


def test_consistent_hashing_keeps_a_task_on_its_replica() -> None:
    ring = FixedRing({"a": [0, 1], "b": [1, 0]})
    result = simulate("consistent", ["a", "b", "a", "b"], num_replicas=2, cache_size=1, ring=ring)
    assert (result.cold_loads, result.served) == (2, [2, 2])
    same = FixedRing({"a": [0, 1], "b": [0, 1]})  # both on r0 with room for one: every request misses
    result = simulate("consistent", ["a", "b", "a", "b"], num_replicas=2, cache_size=1, ring=same)
    assert (result.cold_loads, result.served, result.max_over_mean) == (4, [4, 0], 2.0)


@pytest.mark.parametrize(
    ("replica", "num_replicas", "total", "factor", "slots"),
    [
        (0, 2, 0, 125, 1),  # ceil(1 x 1.25) = 2 slots: 1 each
        (0, 2, 1, 125, 1),  # ceil(2 x 1.25) = 3 slots: 1 each, the remainder to the last
        (1, 2, 1, 125, 2),
        (0, 3, 5, 150, 3),  # 6 x 1.5 = 9 slots: 3 each
        (2, 4, 0, 100, 1),  # 1 slot for 4 replicas: never 0
    ],
)
def test_load_bound_matches_haproxys_formula(
    replica: int, num_replicas: int, total: int, factor: int, slots: int
) -> None:
    assert load_bound(replica, num_replicas, total, factor) == slots


def test_bounded_loads_send_the_overflow_to_the_next_replica() -> None:
    # 3 requests of `a`, all in flight together (duration 10), home r0, next r1:
    # #1: r0 (0 < 1); #2: in flight 1, r0 has 1 slot, full -> r1 (0 < 2);
    # #3: in flight 2, ceil(3 x 1.25) = 4 slots: r0 2, r1 2 -> r0 (1 < 2)
    ring = FixedRing({"a": [0, 1]})
    result = simulate("bounded", ["a"] * 3, num_replicas=2, cache_size=5, duration=10, ring=ring)
    assert (result.served, result.cold_loads) == ([2, 1], 2)
    # one at a time (duration 1) the bound never binds: all on the home replica
    result = simulate("bounded", ["a"] * 3, num_replicas=2, cache_size=5, duration=1, ring=ring)
    assert (result.served, result.cold_loads) == ([3, 0], 1)


def test_zipf_draws_favour_the_first_tasks() -> None:
    tasks = zipf_tasks(num_tasks=100, num_requests=5000, s=1.1, seed=1)
    assert len(tasks) == 5000 and tasks.count("task-0") > tasks.count("task-1") > tasks.count("task-50")


def test_a_real_ring_spreads_tasks_and_affinity_beats_round_robin() -> None:
    ring = Ring(3)
    homes = [next(ring.walk(f"task-{i}")) for i in range(300)]
    assert all(60 <= homes.count(r) <= 140 for r in range(3))
    tasks = zipf_tasks(num_tasks=300, num_requests=3000, s=1.1)
    hashed = simulate("consistent", tasks, 3, cache_size=100, ring=ring)
    round_robin = simulate("round-robin", tasks, 3, cache_size=100)
    assert hashed.cold_loads * 2 < round_robin.cold_loads
