"""Exact tests for the continuous-batching bookkeeping in `server.engine.scheduler`."""

import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from prefix_store.entry import PrefixEntry, PrefixMeta
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import ScheduledBatch, Scheduler, SlotMove


@dataclass
class Req:
    request_id: str


def reqs(*ids: str) -> list[Req]:
    return [Req(i) for i in ids]


def ids(rows: list[Req]) -> list[str]:
    return [r.request_id for r in rows]


def running_scheduler(*request_ids: str) -> Scheduler[Req]:
    """A scheduler whose running rows are exactly `request_ids`, in slot order."""
    scheduler: Scheduler[Req] = Scheduler(max_rows=max(len(request_ids), 1))
    for r in reqs(*request_ids):
        scheduler.add(r)
    scheduler.schedule()
    assert ids(scheduler.running) == list(request_ids)
    return scheduler


def decoding(batch: ScheduledBatch[Any]) -> list[Any]:
    """The rows that were already decoding before this step."""
    return [w.request for w in batch.rows[: batch.num_decode]]


def num_tokens(batch: ScheduledBatch[Any]) -> int:
    return sum(w.num_tokens for w in batch.rows)


def apply_moves(slots: list[str], moves: list[SlotMove], num_rows: int) -> list[str]:
    """Copy slot contents as the KV cache would; return the first `num_rows` slots."""
    slots = list(slots)
    for move in moves:
        assert slots[move.src] == move.request_id
        slots[move.dst] = slots[move.src]
    return slots[:num_rows]


# ---- admission ----------------------------------------------------------------------------


def test_new_scheduler_is_idle() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=2)
    assert scheduler.is_idle
    batch = scheduler.schedule()
    assert decoding(batch) == []
    assert batch.admitted == []
    assert batch.num_rows == 0


def test_fifo_admission() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=8)
    for r in reqs("a", "b", "c"):
        scheduler.add(r)
    assert not scheduler.is_idle
    batch = scheduler.schedule()
    assert ids(decoding(batch)) == []
    assert ids(batch.admitted) == ["a", "b", "c"]
    assert ids(scheduler.running) == ["a", "b", "c"]
    assert list(scheduler.waiting) == []
    for r in reqs("d", "e"):
        scheduler.add(r)
    batch = scheduler.schedule()
    assert ids(decoding(batch)) == ["a", "b", "c"]
    assert ids(batch.admitted) == ["d", "e"]
    assert ids(scheduler.running) == ["a", "b", "c", "d", "e"]


def test_max_rows_bounds_running() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=2)
    for r in reqs("a", "b", "c", "d"):
        scheduler.add(r)
    batch = scheduler.schedule()
    assert ids(batch.admitted) == ["a", "b"]
    assert ids(scheduler.running) == ["a", "b"]
    assert ids(list(scheduler.waiting)) == ["c", "d"]
    # full: nothing admitted, running rows still decode
    batch = scheduler.schedule()
    assert ids(decoding(batch)) == ["a", "b"]
    assert ids(batch.admitted) == []
    # one slot frees up: exactly the next waiting request takes it
    assert scheduler.retire({"a"}) == [SlotMove("b", src=1, dst=0)]
    batch = scheduler.schedule()
    assert ids(decoding(batch)) == ["b"]
    assert ids(batch.admitted) == ["c"]
    assert ids(scheduler.running) == ["b", "c"]
    assert ids(list(scheduler.waiting)) == ["d"]


def test_slots_are_list_indices() -> None:
    scheduler = running_scheduler("a", "b", "c")
    a, b, c = scheduler.running
    assert [scheduler.slot_of(a), scheduler.slot_of(b), scheduler.slot_of(c)] == [0, 1, 2]
    scheduler.retire({"a"})
    assert scheduler.slot_of(c) == 0
    assert scheduler.slot_of(b) == 1


# ---- ScheduledBatch -------------------------------------------------------------------------


def test_prefill_rows_land_in_slots_after_decode_rows() -> None:
    scheduler = running_scheduler("a", "b")
    scheduler.max_rows = 4
    for r in reqs("c", "d"):
        scheduler.add(r)
    batch = scheduler.schedule()
    assert [(ids([w.request])[0], w.slot) for w in batch.rows] == [("a", 0), ("b", 1), ("c", 2), ("d", 3)]
    for request in batch.admitted:
        assert scheduler.slot_of(request) == [w.slot for w in batch.rows if w.request is request][0]


# ---- remove_waiting -------------------------------------------------------------------------


def test_remove_waiting() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=1)
    for r in reqs("a", "b", "c", "d"):
        scheduler.add(r)
    scheduler.schedule()  # "a" runs
    removed = scheduler.remove_waiting("c")
    assert removed == Req("c")
    assert ids(list(scheduler.waiting)) == ["b", "d"]
    assert scheduler.remove_waiting("c") is None  # already gone
    assert scheduler.remove_waiting("a") is None  # running, not waiting
    assert scheduler.remove_waiting("zzz") is None
    assert ids(scheduler.running) == ["a"]
    assert ids(list(scheduler.waiting)) == ["b", "d"]


def test_remove_waiting_returns_the_same_object() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=1)
    r = Req("x")
    scheduler.add(r)
    assert scheduler.remove_waiting("x") is r
    assert scheduler.is_idle


def _request(kv: torch.Tensor) -> Request:
    meta = PrefixMeta("task", 1, 2, 0, "float32", "fp", "2024-01-01T00:00:00Z")
    return Request(PrefixEntry(meta=meta, kv=kv), [1, 2], SamplingParams())


def test_remove_waiting_real_requests_with_reloaded_prefix() -> None:
    """Two waiting requests of one task whose prefix entry was reloaded (equal meta, new tensor).

    BUG: `remove_waiting` removes by value equality (`deque.remove`), so it runs the dataclass
    `Request.__eq__`, which compares the `PrefixEntry` kv tensors and raises
    "Boolean value of Tensor with more than one value is ambiguous".
    """
    first = _request(torch.zeros(1, 2, 1, 2, 1))
    second = _request(torch.zeros(1, 2, 1, 2, 1))  # same task/version, reloaded after eviction
    scheduler: Scheduler[Request] = Scheduler(max_rows=1)
    scheduler.add(first)
    scheduler.add(second)
    assert scheduler.remove_waiting(second.request_id) is second
    assert list(scheduler.waiting) == [first] and scheduler.waiting[0] is first


# ---- retire -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finished", "expected_moves", "expected_running"),
    [
        (set(), [], ["a", "b", "c", "d", "e"]),
        ({"zzz"}, [], ["a", "b", "c", "d", "e"]),
        ({"a"}, [SlotMove("e", src=4, dst=0)], ["e", "b", "c", "d"]),
        ({"c"}, [SlotMove("e", src=4, dst=2)], ["a", "b", "e", "d"]),
        ({"e"}, [], ["a", "b", "c", "d"]),
        (
            {"a", "c"},
            [SlotMove("e", src=4, dst=0), SlotMove("d", src=3, dst=2)],
            ["e", "b", "d"],
        ),
        ({"b", "e"}, [SlotMove("d", src=3, dst=1)], ["a", "d", "c"]),  # last finished with a middle one
        ({"a", "d", "e"}, [SlotMove("c", src=2, dst=0)], ["c", "b"]),
        ({"b", "c"}, [SlotMove("e", src=4, dst=1), SlotMove("d", src=3, dst=2)], ["a", "e", "d"]),
        ({"a", "b"}, [SlotMove("e", src=4, dst=0), SlotMove("d", src=3, dst=1)], ["e", "d", "c"]),
        ({"b", "c", "d"}, [SlotMove("e", src=4, dst=1)], ["a", "e"]),
        ({"c", "d", "e"}, [], ["a", "b"]),
        ({"a", "b", "c", "d"}, [SlotMove("e", src=4, dst=0)], ["e"]),
        ({"b", "c", "d", "e"}, [], ["a"]),
        ({"a", "b", "c", "d", "e"}, [], []),
    ],
)
def test_retire_exact_moves(
    finished: set[str], expected_moves: list[SlotMove], expected_running: list[str]
) -> None:
    scheduler = running_scheduler("a", "b", "c", "d", "e")
    moves = scheduler.retire(finished)
    assert moves == expected_moves
    assert ids(scheduler.running) == expected_running
    assert apply_moves(["a", "b", "c", "d", "e"], moves, len(expected_running)) == expected_running


def test_retire_single_row() -> None:
    scheduler = running_scheduler("a")
    assert scheduler.retire({"a"}) == []
    assert scheduler.running == []
    assert scheduler.is_idle


def test_retire_on_empty_scheduler() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=4)
    assert scheduler.retire({"a"}) == []
    assert scheduler.running == []


def test_retire_leaves_waiting_alone() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=2)
    for r in reqs("a", "b", "c"):
        scheduler.add(r)
    scheduler.schedule()
    assert scheduler.retire({"a", "c"}) == [SlotMove("b", src=1, dst=0)]  # "c" waits: not retired
    assert ids(scheduler.running) == ["b"]
    assert ids(list(scheduler.waiting)) == ["c"]


def test_retire_random_finished_sets_match_simulated_slots() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        num_rows = rng.randint(0, 12)
        names = [f"r{i}" for i in range(num_rows)]
        scheduler = running_scheduler(*names)
        finished = {n for n in names if rng.random() < rng.random()}
        if rng.random() < 0.1:
            finished.add("not-running")
        moves = scheduler.retire(finished)
        survivors = [n for n in names if n not in finished]
        final = ids(scheduler.running)
        # same survivors, compact in slots 0..n-1
        assert sorted(final) == sorted(survivors)
        assert len(final) == len(survivors)
        # every move takes a live row from beyond the end into a hole, and each row moves at most once
        assert all(m.request_id not in finished and m.dst < m.src for m in moves)
        assert all(m.dst < len(final) <= m.src for m in moves)
        assert len({m.request_id for m in moves}) == len(moves)
        # rows that were not moved kept their slot
        moved = {m.request_id for m in moves}
        for slot, name in enumerate(final):
            if name not in moved:
                assert names[slot] == name
        # applying the moves in order to a slot array yields exactly the running order
        assert apply_moves(names, moves, len(final)) == final
        # slot_of agrees with the list index
        for slot, request in enumerate(scheduler.running):
            assert scheduler.slot_of(request) == slot


# --- fairness across tenants -----------------------------------------------------------------------


def _tenant(r: Req) -> str:
    return r.request_id.split(":", 1)[0]


def test_a_long_queue_does_not_delay_another_tenant_by_more_than_one_round() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=1, tenant_of=_tenant)
    for i in range(1000):
        scheduler.add(Req(f"noisy:{i}"))
    scheduler.add(Req("quiet:only"))
    admitted = []
    for _ in range(3):
        admitted += ids(scheduler.schedule().admitted)
        scheduler.retire({r.request_id for r in scheduler.running})
    assert admitted == ["noisy:0", "quiet:only", "noisy:1"]


def test_round_robin_over_tenants_fifo_within_each() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=6, tenant_of=_tenant)
    for name in ("a:1", "a:2", "a:3", "a:4", "b:1", "c:1", "b:2"):
        scheduler.add(Req(name))
    assert ids(scheduler.schedule().admitted) == ["a:1", "b:1", "c:1", "a:2", "b:2", "a:3"]
    assert ids(list(scheduler.waiting)) == ["a:4"]


def test_without_tenants_admission_is_fifo() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=3)
    for name in ("a:1", "a:2", "b:1"):
        scheduler.add(Req(name))
    assert ids(scheduler.schedule().admitted) == ["a:1", "a:2", "b:1"]


# --- token budget, chunked prefill ----------------------------------------------------------------


@dataclass
class Job:
    request_id: str
    num_tokens: int = 1


def _budget_scheduler(max_rows: int, budget: int, **kwargs) -> Scheduler[Job]:  # type: ignore[no-untyped-def]
    return Scheduler(max_rows, num_tokens_of=lambda j: j.num_tokens, max_num_tokens=budget, **kwargs)


def _plan(batch: ScheduledBatch[Job]) -> list[tuple[str, int, int, int, bool]]:
    return [(w.request.request_id, w.slot, w.start, w.num_tokens, w.samples) for w in batch.rows]


def test_decode_rows_first_then_chunks_within_the_budget() -> None:
    scheduler = _budget_scheduler(max_rows=4, budget=10)
    scheduler.add(Job("a", 3))
    scheduler.add(Job("b", 2))
    assert _plan(scheduler.schedule()) == [("a", 0, 0, 3, True), ("b", 1, 0, 2, True)]
    scheduler.add(Job("long", 25))
    scheduler.add(Job("c", 4))
    # a and b decode (1 token each); the long prompt takes the 8 left and samples nothing
    batch = scheduler.schedule()
    assert _plan(batch) == [("a", 0, 3, 1, True), ("b", 1, 2, 1, True), ("long", 2, 0, 8, False)]
    assert ids(decoding(batch)) == ["a", "b"] and ids(batch.admitted) == ["long"] and num_tokens(batch) == 10
    assert ids(list(scheduler.waiting)) == ["c"]  # no budget left to start it
    # the prefill under way continues before anyone new starts
    assert _plan(scheduler.schedule()) == [
        ("a", 0, 4, 1, True),
        ("b", 1, 3, 1, True),
        ("long", 2, 8, 8, False),
    ]
    assert _plan(scheduler.schedule()) == [
        ("a", 0, 5, 1, True),
        ("b", 1, 4, 1, True),
        ("long", 2, 16, 8, False),
    ]
    # its last chunk samples; the budget left starts the next prompt in the same step
    batch = scheduler.schedule()
    assert _plan(batch) == [
        ("a", 0, 6, 1, True), ("b", 1, 5, 1, True), ("long", 2, 24, 1, True), ("c", 3, 0, 4, True),
    ]  # fmt: skip
    assert batch.num_decode == 2
    assert [scheduler.num_computed(j) for j in scheduler.running] == [7, 6, 25, 4]
    batch = scheduler.schedule()
    assert batch.num_decode == 4 and num_tokens(batch) == 4


def test_without_a_budget_every_prompt_runs_whole() -> None:
    scheduler: Scheduler[Job] = Scheduler(3, num_tokens_of=lambda j: j.num_tokens)
    for job in (Job("a", 300), Job("b", 7)):
        scheduler.add(job)
    assert _plan(scheduler.schedule()) == [("a", 0, 0, 300, True), ("b", 1, 0, 7, True)]


def test_retired_rows_forget_their_progress() -> None:
    scheduler = _budget_scheduler(max_rows=2, budget=4)
    scheduler.add(Job("a", 10))
    scheduler.schedule()
    assert scheduler.num_computed(scheduler.running[0]) == 4
    scheduler.retire({"a"})
    assert scheduler.num_computed(Job("a")) == 0


# --- per-tenant row caps and fair share ------------------------------------------------------------


def test_a_tenant_holding_every_slot_gives_one_back_within_one_step() -> None:
    """Issue 12 (3b): one tenant's 16 rows (n=16, each to decode 1000 tokens) fill every slot;
    another tenant's 2-token request starts on the next step (the hog's newest row is preempted
    and recomputed later), not when the hog's rows finish."""
    scheduler = _budget_scheduler(max_rows=16, budget=64, tenant_of=_tenant)
    for i in range(16):
        scheduler.add(Job(f"hog:{i}", 3))
    for _ in range(20):  # the hog's rows are decoding
        scheduler.schedule()
    assert [j.request_id for j in scheduler.running] == [f"hog:{i}" for i in range(16)]
    for i in range(16, 32):  # the hog queues more too
        scheduler.add(Job(f"hog:{i}", 3))
    scheduler.add(Job("small:0", 2))
    batch = scheduler.schedule()
    assert "hog:15" not in ids(scheduler.running) and batch.num_preempted_for_fairness == 1  # preempted
    assert batch.moves == []  # the last slot was freed: nothing to compact
    assert ids(batch.admitted) == ["small:0"] and scheduler.slot_of(batch.admitted[0]) == 15
    assert ids(list(scheduler.waiting))[:2] == ["hog:15", "hog:16"]  # back at the head of its tenant's queue
    # the hog (15 rows) is still above its fair share of 8: nothing of it is admitted, nothing more preempted
    running = ids(scheduler.running)
    batch = scheduler.schedule()
    assert ids(scheduler.running) == running and batch.admitted == []
    scheduler.retire({"small:0"})
    batch = scheduler.schedule()  # alone again: the slot goes back to the hog, recomputing from scratch
    assert ids(batch.admitted) == ["hog:15"] and batch.rows[-1].start == 0


def test_preemption_takes_the_newest_row_of_the_tenant_most_over_its_share() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=6, tenant_of=_tenant)
    for name in ("a:1", "a:2", "a:3", "a:4", "b:1", "b:2"):
        scheduler.add(Req(name))
    scheduler.schedule()
    assert ids(scheduler.running) == ["a:1", "b:1", "a:2", "b:2", "a:3", "a:4"]
    scheduler.add(Req("c:1"))
    batch = scheduler.schedule()  # fair share: 6 // 3 = 2; a holds 4
    assert ids(batch.admitted) == ["c:1"] and ids(list(scheduler.waiting)) == ["a:4"]  # a:4 preempted
    assert ids(scheduler.running) == ["a:1", "b:1", "a:2", "b:2", "a:3", "c:1"]


def test_max_rows_per_tenant_is_a_hard_cap() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=8, tenant_of=_tenant, max_rows_per_tenant=2)
    for name in ("a:1", "a:2", "a:3", "b:1"):
        scheduler.add(Req(name))
    assert ids(scheduler.schedule().admitted) == ["a:1", "b:1", "a:2"]
    assert ids(scheduler.schedule().admitted) == []  # a free slot, but a is at its cap
    scheduler.retire({"a:1"})
    assert ids(scheduler.schedule().admitted) == ["a:3"]


def test_slot_moves_after_preempting_a_middle_row() -> None:
    scheduler: Scheduler[Req] = Scheduler(max_rows=4, tenant_of=_tenant)
    for name in ("a:1", "a:2", "a:3"):
        scheduler.add(Req(name))
    scheduler.schedule()
    scheduler.add(Req("b:1"))
    scheduler.schedule()  # a free slot: b starts without preemption
    assert ids(scheduler.running) == ["a:1", "a:2", "a:3", "b:1"]
    scheduler.add(Req("c:1"))  # share 4 // 3 = 1: a holds 3
    batch = scheduler.schedule()
    assert ids(list(scheduler.waiting)) == ["a:3"]  # preempted
    assert batch.moves == [SlotMove("b:1", src=3, dst=2)]
    assert ids(scheduler.running) == ["a:1", "a:2", "b:1", "c:1"]


def test_paused_rows_keep_their_slot_but_are_not_scheduled() -> None:
    scheduler = running_scheduler("a", "b")
    scheduler.paused.add("a")
    batch = scheduler.schedule()
    assert [w.request.request_id for w in batch.rows] == ["b"] and ids(scheduler.running) == ["a", "b"]
    assert not scheduler.is_idle
    scheduler.paused.add("b")
    assert scheduler.is_idle and scheduler.schedule().rows == []  # nothing to compute
    scheduler.retire({"a"})
    assert scheduler.paused == {"b"}
    scheduler.paused.discard("b")
    assert [w.request.request_id for w in scheduler.schedule().rows] == ["b"]


def _tenant_job(j: Job) -> str:
    return j.request_id.split(":", 1)[0]


def test_prefill_shares_the_step_budget_round_robin_between_tenants() -> None:
    """Finding #6 of issue 25: one tenant's long prompts took every step's whole budget. Now each
    tenant with a prefill under way (or waiting while a slot is free) gets an equal share; what a
    tenant leaves unused goes to the others (work-conserving)."""
    scheduler = _budget_scheduler(max_rows=4, budget=64, tenant_of=_tenant_job)
    scheduler.add(Job("hog:1", 1000))
    assert _plan(scheduler.schedule()) == [("hog:1", 0, 0, 64, False)]  # alone: the whole budget
    scheduler.add(Job("hog:2", 1000))
    scheduler.add(Job("quiet:1", 40))
    # hog's prefill under way gets half; quiet is admitted (round robin) with the other half, and
    # hog:2 waits: nothing is left
    assert _plan(scheduler.schedule()) == [("hog:1", 0, 64, 32, False), ("quiet:1", 1, 0, 32, False)]
    # quiet needs only 8 more: hog's prefill gets its 32, and the 24 nobody wanted start hog:2
    assert _plan(scheduler.schedule()) == [
        ("hog:1", 0, 96, 32, False), ("quiet:1", 1, 32, 8, True), ("hog:2", 2, 0, 24, False),
    ]  # fmt: skip
    # quiet decodes; hog alone shares the rest between its prefills in slot order
    assert _plan(scheduler.schedule()) == [("quiet:1", 1, 40, 1, True), ("hog:1", 0, 128, 63, False)]


def test_prefill_share_without_tenants_is_the_whole_budget_in_slot_order() -> None:
    scheduler = _budget_scheduler(max_rows=4, budget=64)
    for job in (Job("a:1", 1000), Job("b:1", 40)):
        scheduler.add(job)
    assert _plan(scheduler.schedule()) == [("a:1", 0, 0, 64, False)]
    assert _plan(scheduler.schedule()) == [("a:1", 0, 64, 64, False)]  # FIFO: b:1 waits for budget


def test_while_rows_decode_one_rows_prefill_chunk_is_capped_to_the_stall_budget() -> None:
    """Stall-free batching: with 40 rows decoding and `max_stall` 1.5, a long prompt feeds
    0.5 * 40 = 20 tokens a step (not the 472 the token budget leaves), so its chunks stretch
    the decode rows' step by about 1.5x at most; with nobody decoding it takes the whole budget.
    The cap is per row: short prompts arriving together still start together."""
    scheduler = _budget_scheduler(max_rows=64, budget=512, max_stall=1.5, min_prefill_tokens=8)
    scheduler.add(Job("first", 1000))
    assert _plan(scheduler.schedule()) == [("first", 0, 0, 512, False)]  # nobody decodes yet
    scheduler.retire({"first"})
    for i in range(40):
        scheduler.add(Job(f"d{i}", 1))
    scheduler.schedule()  # 40 one-token prompts: decoding from the next step on
    scheduler.add(Job("long", 1000))
    batch = scheduler.schedule()
    assert batch.num_decode == 40 and _plan(batch)[40:] == [("long", 40, 0, 20, False)]
    for name in ("s1", "s2"):
        scheduler.add(Job(name, 15))
    assert _plan(scheduler.schedule())[40:] == [
        ("long", 40, 20, 20, False), ("s1", 41, 0, 15, True), ("s2", 42, 0, 15, True),
    ]  # fmt: skip
    assert scheduler.chunk_cap(40) == 20 and scheduler.chunk_cap(41) == 20 and scheduler.chunk_cap(0) > 512


def test_the_stall_cap_has_a_floor_so_prompts_move_when_few_rows_decode() -> None:
    scheduler = _budget_scheduler(max_rows=8, budget=512, max_stall=1.5, min_prefill_tokens=8)
    scheduler.add(Job("a", 1))
    scheduler.schedule()
    scheduler.add(Job("long", 100))
    # one row decodes: 0.5 token would starve the prompt, the floor gives it 8
    assert _plan(scheduler.schedule()) == [("a", 0, 1, 1, True), ("long", 1, 0, 8, False)]
    assert _plan(scheduler.schedule()) == [("a", 0, 2, 1, True), ("long", 1, 8, 8, False)]
    assert scheduler.chunk_cap(1) == 8 and scheduler.chunk_cap(100) == 50


def test_without_max_stall_a_prompt_fills_the_whole_budget_beside_decode_rows() -> None:
    scheduler = _budget_scheduler(max_rows=8, budget=100)
    scheduler.add(Job("a", 1))
    scheduler.schedule()
    scheduler.add(Job("long", 1000))
    assert _plan(scheduler.schedule()) == [("a", 0, 1, 1, True), ("long", 1, 0, 99, False)]


def test_one_tenants_prefills_together_get_at_most_its_rows_worth_of_stall_chunks() -> None:
    """Finding #6 of issue 25: eight long prompts of one key fed 8 stall chunks a step beside
    everyone's decode rows. With `prefill_rows_per_tenant` 2 and a 10-token chunk cap, the hog's
    prefills feed 20 tokens a step in all, while another tenant's prompt still starts at once."""
    scheduler = _budget_scheduler(
        max_rows=16, budget=512, max_stall=1.5, min_prefill_tokens=10, prefill_rows_per_tenant=2,
        tenant_of=_tenant_job,
    )  # fmt: skip
    scheduler.add(Job("quiet:1", 1))
    scheduler.schedule()  # quiet:1 decodes from now on
    for i in range(4):
        scheduler.add(Job(f"hog:{i}", 1000))
    plan = _plan(scheduler.schedule())
    assert plan == [("quiet:1", 0, 1, 1, True), ("hog:0", 1, 0, 10, False), ("hog:1", 2, 0, 10, False)]
    scheduler.add(Job("quiet:2", 30))
    plan = _plan(scheduler.schedule())
    hog_tokens = sum(n for name, _, _, n, _ in plan if name.startswith("hog"))
    assert hog_tokens == 20 and ("quiet:2", 3, 0, 10, False) in plan
    assert scheduler.chunk_cap(1) == 10


def test_a_tenant_alone_is_not_held_to_the_per_tenant_prefill_cap() -> None:
    """Only another tenant's decode rows are stalled by a prefill: a tenant whose own rows are the
    only ones decoding keeps the per-row stall cap alone (every long prompt gets its chunk)."""
    scheduler = _budget_scheduler(
        max_rows=16, budget=512, max_stall=1.5, min_prefill_tokens=10, prefill_rows_per_tenant=2,
        tenant_of=_tenant_job,
    )  # fmt: skip
    scheduler.add(Job("hog:d", 1))
    scheduler.schedule()
    for i in range(4):
        scheduler.add(Job(f"hog:{i}", 1000))
    plan = _plan(scheduler.schedule())
    assert [n for name, _, _, n, _ in plan if name != "hog:d"] == [10, 10, 10, 10]
