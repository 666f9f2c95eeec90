"""The engine in-process over a tiny GPT-2: aborts, step failures, queue bound, slot reuse."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from prefix_store.entry import PrefixEntry, PrefixMeta
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import ContextTooLong, InvalidInput, QueueFull
from server.engine.handle import PAUSE_AT, RequestHandle
from server.engine.kv_cache import KVLayout, SlotKVCache
from server.engine.model_loader import LoadedModel, ModelOptions, load_model
from server.engine.precision import needs_fallback
from server.engine.request import Request, SamplingParams, StepOutput
from tests.tiny_models import MAX_POSITIONS, save_tiny_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = save_tiny_model("gpt2", tmp_path_factory.mktemp("m") / "model")
    return load_model(ModelOptions(str(path), "cpu", "float32", Path(tmp_path_factory.mktemp("data"))))


def _prefix(prefix_len: int, seed: int) -> PrefixEntry:
    torch.manual_seed(seed)
    meta = PrefixMeta(f"t{seed}", 1, prefix_len, 0, "float32", "fp", "now")
    return PrefixEntry(meta, torch.randn(2, 2, 4, prefix_len, 8))


def _engine(
    loaded: LoadedModel, num_slots: int = 4, max_queue: int = 16, request_timeout_s: float | None = None
) -> Engine:
    layout = KVLayout(2, 4, 8, num_slots, MAX_POSITIONS, torch.float32, torch.device("cpu"))
    return Engine(loaded, SlotKVCache(layout), EngineConfig(max_queue, request_timeout_s=request_timeout_s))


@pytest.fixture
def run_engine(loaded: LoadedModel) -> Iterator:  # type: ignore[type-arg]
    """Runs `body(engine)` inside an event loop with a started engine."""
    engines: list[Engine] = []

    def run(body, **kwargs):  # type: ignore[no-untyped-def]
        async def main():  # type: ignore[no-untyped-def]
            engine = _engine(loaded, **kwargs)
            engines.append(engine)
            engine.start(asyncio.get_running_loop())
            try:
                return await asyncio.wait_for(body(engine), timeout=60)
            finally:
                engine.stop()

        return asyncio.run(main())

    yield run
    assert all(not e.is_alive for e in engines)


async def _collect(handle: RequestHandle) -> list[StepOutput]:
    return [o async for o in handle]


async def _collect_rest(first: StepOutput, rest: AsyncIterator[StepOutput]) -> list[StepOutput]:
    return [first] + [o async for o in rest]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def test_abort_frees_the_slot_and_others_continue(run_engine) -> None:  # type: ignore[no-untyped-def]
    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        long = engine.submit(_prefix(3, 1), [5, 6], _greedy(200))
        other = engine.submit(_prefix(2, 2), [7], _greedy(30))
        stream = long.__aiter__()
        await stream.__anext__()
        await stream.aclose()  # the caller went away
        outputs = await _collect(other)
        for _ in range(200):
            if engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        return long.request, outputs, engine.stats()

    aborted, outputs, stats = run_engine(body)
    assert aborted.finish_reason == "abort" and len(aborted.output_ids) < 200
    assert len(outputs) == 30 and outputs[-1].finish_reason == "length"
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_a_failing_step_fails_its_rows_but_not_the_loop(run_engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        real = engine.core.runner.forward
        calls = {"n": 0}

        def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected failure")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.core.runner, "forward", flaky)
        failed = await _collect(engine.submit(_prefix(3, 1), [5], _greedy(4)))
        fine = await _collect(engine.submit(_prefix(3, 1), [5], _greedy(4)))
        return failed, fine, engine.is_alive

    failed, fine, is_alive = run_engine(body)
    assert failed[-1].finish_reason == "error" and "injected failure" in (failed[-1].error or "")
    assert [o.finish_reason for o in fine] == [None, None, None, "length"]
    assert is_alive


def test_queue_bound_and_validation(run_engine) -> None:  # type: ignore[no-untyped-def]
    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        handles = [engine.submit(_prefix(2, i), [5], _greedy(50)) for i in range(3)]  # 1 slot + 2 queued...
        errors = []
        for prompt, params in (([], _greedy(1)), ([10**6], _greedy(1)), ([5] * 250, _greedy(10))):
            try:
                engine.submit(_prefix(2, 9), prompt, params)
            except (InvalidInput, ContextTooLong) as exc:
                errors.append(type(exc).__name__)
        results = await asyncio.gather(*(_collect(h) for h in handles))
        return errors, results

    def overfill(engine: Engine) -> int:
        accepted = 0
        try:
            for i in range(10):
                engine.submit(_prefix(2, i), [5], _greedy(50))
                accepted += 1
        except QueueFull:
            pass
        return accepted

    async def fill(engine: Engine):  # type: ignore[no-untyped-def]
        return overfill(engine)

    errors, results = run_engine(body, num_slots=1, max_queue=4)
    assert errors == ["InvalidInput", "InvalidInput", "ContextTooLong"]
    assert [len(r) for r in results] == [50, 50, 50]
    # at most max_queue wait (plus the one the engine may already have moved into its slot)
    assert run_engine(fill, num_slots=1, max_queue=4) in (4, 5)


def test_many_rows_through_few_slots_match_solo_runs(run_engine) -> None:  # type: ignore[no-untyped-def]
    """Rows come and go (slot compaction moves K/V): every output equals the same row run alone."""
    cases = [(_prefix(1 + i % 5, i), [5 + i] * (1 + 3 * i), 4 + (7 * i) % 13) for i in range(10)]

    async def solo(engine: Engine):  # type: ignore[no-untyped-def]
        return [
            [t for o in await _collect(engine.submit(p, ids, _greedy(n))) for t in o.token_ids]
            for p, ids, n in cases
        ]

    async def together(engine: Engine):  # type: ignore[no-untyped-def]
        handles = [engine.submit(p, ids, _greedy(n)) for p, ids, n in cases]
        outs = await asyncio.gather(*(_collect(h) for h in handles))
        return [[t for o in out for t in o.token_ids] for out in outs]

    assert run_engine(together, num_slots=3) == run_engine(solo, num_slots=3)


def test_stop_string_truncates(run_engine) -> None:  # type: ignore[no-untyped-def]
    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        for seed in range(50):  # a prefix whose greedy text is long enough to cut
            prefix = _prefix(2, seed)
            free = await _collect(engine.submit(prefix, [5, 6, 7], _greedy(40)))
            text = "".join(o.text_delta for o in free)
            if len(text) >= 8:
                break
        stop = text[5:7]
        stopped = await _collect(
            engine.submit(prefix, [5, 6, 7], SamplingParams(max_new_tokens=40, stop=(stop,)))
        )
        return text, stop, stopped

    text, stop, stopped = run_engine(body)
    assert len(stop) == 2
    assert stopped[-1].finish_reason == "stop"
    assert "".join(o.text_delta for o in stopped) == text[: text.index(stop)]


def test_bfloat16_model_serves_mixed_rows(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`--dtype bfloat16`: model, slots and prefixes in bf16; logits still sampled in float32.
    A few steps of a 2-layer model: seconds even where bf16 is emulated."""
    if (slow := needs_fallback(torch.bfloat16, "cpu")) is not None:
        print(f"bf16 on cpu: {slow.reason()}; tiny model, so bf16 anyway")
    path = save_tiny_model("llama", tmp_path_factory.mktemp("bf16") / "model")
    loaded = load_model(ModelOptions(str(path), "cpu", "bfloat16", Path(tmp_path_factory.mktemp("d"))))
    assert loaded.dtype == torch.bfloat16 and next(loaded.model.parameters()).dtype == torch.bfloat16
    layout = KVLayout(2, 2, 8, 4, MAX_POSITIONS, torch.bfloat16, torch.device("cpu"))

    def prefix(prefix_len: int, seed: int) -> PrefixEntry:
        torch.manual_seed(seed)
        meta = PrefixMeta(f"b{seed}", 1, prefix_len, 0, "bfloat16", "fp", "now")
        return PrefixEntry(meta, torch.randn(2, 2, 2, prefix_len, 8).to(torch.bfloat16))

    async def main():  # type: ignore[no-untyped-def]
        engine = Engine(loaded, SlotKVCache(layout), EngineConfig(max_queue=8))
        engine.start(asyncio.get_running_loop())
        try:
            handles = [engine.submit(prefix(1 + i, i), [5 + i] * (2 + i), _greedy(6)) for i in range(4)]
            return await asyncio.gather(*(_collect(h) for h in handles))
        finally:
            engine.stop()

    for outputs in asyncio.run(main()):
        assert len(outputs) == 6 and outputs[-1].finish_reason == "length"


def test_a_row_with_non_finite_logits_fails_alone(run_engine) -> None:  # type: ignore[no-untyped-def]
    """A pathological prefix (huge values: NaN/Inf downstream) fails its own request only."""
    poisoned = PrefixEntry(
        PrefixMeta("bad", 1, 3, 0, "float32", "fp", "now"), torch.full((2, 2, 4, 3, 8), 3e38)
    )
    healthy = [(_prefix(2, i), [5 + i, 6], _greedy(6)) for i in range(3)]

    async def solo(engine: Engine):  # type: ignore[no-untyped-def]
        return [
            [t for o in await _collect(engine.submit(p, ids, n)) for t in o.token_ids]
            for p, ids, n in healthy
        ]

    async def mixed(engine: Engine):  # type: ignore[no-untyped-def]
        handles = [engine.submit(poisoned, [5, 6], _greedy(6))] + [engine.submit(*h) for h in healthy]
        outs = await asyncio.gather(*(_collect(h) for h in handles))
        return outs[0], [[t for o in out for t in o.token_ids] for out in outs[1:]], engine.is_alive

    bad, good, is_alive = run_engine(mixed)
    assert bad[-1].finish_reason == "error" and "non-finite" in (bad[-1].error or "")
    assert good == run_engine(solo) and is_alive


def test_request_timeout_ends_running_and_waiting_rows_and_frees_their_slots(run_engine) -> None:  # type: ignore[no-untyped-def]
    """Past `request_timeout_s` a running row and a queued one both end with `timeout`; the slot is
    free again for the next request, which runs to its end."""

    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        long_run = engine.submit(_prefix(2, 0), [5, 6], _greedy(MAX_POSITIONS - 10))
        queued = engine.submit(_prefix(2, 1), [7], _greedy(4))  # one slot: waits behind long_run
        outputs = aiter(long_run)
        first = await anext(outputs)
        assert long_run.request.deadline is not None and first.finish_reason is None
        long_run.request.deadline = queued.request.deadline = time.monotonic()  # both expire now
        ends = await asyncio.gather(_collect_rest(first, outputs), _collect(queued))
        stats = engine.stats()
        after = await _collect(engine.submit(_prefix(2, 2), [8], _greedy(3)))
        return ends, stats, after

    (long_out, queued_out), stats, after = run_engine(body, num_slots=1, request_timeout_s=60)
    assert long_out[-1].finish_reason == "timeout" and "timeout" in (long_out[-1].error or "")
    assert sum(len(o.token_ids) for o in long_out) < MAX_POSITIONS - 10
    assert [o.finish_reason for o in queued_out] == ["timeout"]
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert after[-1].finish_reason == "length" and sum(len(o.token_ids) for o in after) == 3


def test_tenant_given_at_submit_is_the_fairness_unit(run_engine) -> None:  # type: ignore[no-untyped-def]
    """An API key's requests form one tenant whatever their tasks; without one, the task's namespace."""

    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        keyed = engine.submit(_prefix(2, 0), [5], _greedy(1), tenant="key_a")
        plain = engine.submit(_prefix(2, 1), [5], _greedy(1))
        tenants = [keyed.request.tenant, plain.request.tenant]
        await asyncio.gather(_collect(keyed), _collect(plain))
        return tenants

    assert run_engine(body) == ["key_a", "t1"]


def test_a_tenant_with_1000_queued_requests_delays_another_by_at_most_one_round(run_engine) -> None:  # type: ignore[no-untyped-def]
    """One slot, tenant A queues 1,000 requests, then tenant B sends one: between B's arrival and
    its admission at most one of A's is admitted (one round), though hundreds of A's still wait."""

    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        noisy = [engine.submit(_prefix(2, 0), [5], _greedy(2), tenant="key_a") for _ in range(1000)]
        single = engine.submit(_prefix(2, 1), [6], _greedy(2), tenant="key_b")
        await _collect(single)
        arrived, admitted = single.request.arrival_time, single.request.admitted_time
        assert admitted is not None
        times = [h.request.admitted_time for h in noisy]
        num_ahead = sum(t is not None and arrived <= t < admitted for t in times)
        num_waiting = sum(t is None for t in times)
        for handle in noisy:
            handle.cancel()
        return num_ahead, num_waiting

    num_ahead, num_waiting = run_engine(body, num_slots=1, max_queue=2000)
    assert num_ahead <= 1 and num_waiting > 500


def test_a_tenant_filling_the_queue_is_shed_for_another_tenant(run_engine) -> None:  # type: ignore[no-untyped-def]
    """Queue of 3, tenant A holds it all: B's request is queued and A's newest ends with `shed`
    (429 over HTTP); at A 2 / B 1 nobody holds more than the other would with one more, so both
    get QueueFull; the rest all run to their end."""

    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        running = engine.submit(_prefix(2, 0), [5], _greedy(MAX_POSITIONS - 10), tenant="a")
        await anext(aiter(running))  # admitted; no await below until the checks: the slot stays busy
        queued = [engine.submit(_prefix(2, 0), [5], _greedy(1), tenant="a") for _ in range(3)]
        b_first = engine.submit(_prefix(2, 1), [6], _greedy(1), tenant="b")
        for tenant in ("a", "b"):
            with pytest.raises(QueueFull):
                engine.submit(_prefix(2, 1), [6], _greedy(1), tenant=tenant)
        running.cancel()
        shed = await _collect(queued[-1])
        ends = [await _collect(h) for h in (*queued[:2], b_first)]
        return shed, [o[-1].finish_reason for o in ends]

    shed, ends = run_engine(body, num_slots=1, max_queue=3)
    assert [o.finish_reason for o in shed] == ["shed"] and "queue is full" in (shed[0].error or "")
    assert ends == ["length", "length", "length"]


def test_a_tenant_holding_every_slot_does_not_make_another_wait_for_it(run_engine) -> None:  # type: ignore[no-untyped-def]
    """Issue 12 (3b): tenant A's n=4 long requests hold every slot; tenant B's 2-token request
    finishes while A's rows are still far from done (one of A's rows is preempted and recomputed),
    and A's rows still get every token they asked for."""

    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        hog = [engine.submit(_prefix(2, 0), [5, 6], _greedy(200), tenant="a") for _ in range(4)]
        streams = [h.__aiter__() for h in hog]
        for stream in streams:
            await stream.__anext__()  # every slot is A's and decoding
        small = await _collect(engine.submit(_prefix(2, 1), [7], _greedy(2), tenant="b"))
        progress = [len(h.request.output_ids) for h in hog]
        rest = await asyncio.gather(*(_collect_rest(StepOutput("", [], ""), s) for s in streams))
        return small, progress, [sum(len(o.token_ids) for o in r) + 1 for r in rest]

    small, progress, totals = run_engine(body, num_slots=4)
    assert [o.finish_reason for o in small] == [None, "length"]
    assert max(progress) < 100  # B did not wait for A's rows to finish
    assert totals == [200] * 4


def test_a_row_whose_reader_stops_pauses_and_resumes_with_the_same_tokens(run_engine) -> None:  # type: ignore[no-untyped-def]
    """A reader PAUSE_AT outputs behind pauses its row (no compute, no growing buffer) while the
    other rows go on; once it reads again the row resumes and ends as it would have."""

    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        reference = await _collect(engine.submit(_prefix(3, 1), [5, 6], _greedy(200)))
        unread = engine.submit(_prefix(3, 1), [5, 6], _greedy(200))
        other = await _collect(engine.submit(_prefix(2, 2), [7], _greedy(150)))  # runs meanwhile
        num_made = len(unread.request.output_ids)
        await asyncio.sleep(0.3)
        assert len(unread.request.output_ids) == num_made  # paused: nothing more computed
        assert PAUSE_AT <= num_made <= PAUSE_AT + 4 and unread.num_unread == num_made
        resumed = await _collect(unread)
        return reference, resumed, other

    reference, resumed, other = run_engine(body)
    assert [t for o in resumed for t in o.token_ids] == [t for o in reference for t in o.token_ids]
    assert len(resumed) == 200 and len(other) == 150


async def _until_paused(handle: RequestHandle) -> None:
    while not handle.is_paused and not handle.request.is_finished:
        await asyncio.sleep(0.01)


def _expire_in(engine: Engine, request: Request, seconds: float) -> None:
    """Move a request's deadline closer (a shorter --request-timeout without a slow test)."""
    with engine._wakeup:
        request.deadline = time.monotonic() + seconds
        engine._wakeup.notify()  # a bare notify: not a kick, nothing else changed


def test_a_paused_row_times_out_though_the_engine_has_nothing_to_run(run_engine) -> None:  # type: ignore[no-untyped-def]
    """Every running row paused and nothing waiting: the engine sleeps, yet wakes at the deadline."""

    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        unread = engine.submit(_prefix(2, 0), [5, 6], _greedy(200))
        await _until_paused(unread)
        for _ in range(200):  # the pause is a message: the core takes it in at its next step
            if engine.core.is_idle:
                break
            await asyncio.sleep(0.01)
        assert unread.is_paused and engine.core.is_idle
        _expire_in(engine, unread.request, 0.2)
        await asyncio.sleep(0.6)  # past the deadline, still unread
        return await _collect(unread), engine.stats()

    outputs, stats = run_engine(body, num_slots=2, request_timeout_s=60)
    assert outputs[-1].finish_reason == "timeout"
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_paused_rows_with_requests_waiting_do_not_spin(run_engine) -> None:  # type: ignore[no-untyped-def]
    """The only slot held by a paused row and a request waiting for it: nothing can run, so the
    engine thread blocks (no CPU); at the paused row's deadline it wakes, and the waiting
    request gets the slot and runs to its end."""

    async def body(engine: Engine):  # type: ignore[no-untyped-def]
        unread = engine.submit(_prefix(2, 0), [5, 6], _greedy(200))
        await _until_paused(unread)
        queued = engine.submit(_prefix(2, 1), [7], _greedy(4))
        await asyncio.sleep(0.05)
        cpu_before, wall_before = time.process_time(), time.monotonic()
        await asyncio.sleep(0.8)
        cpu_s, wall_s = time.process_time() - cpu_before, time.monotonic() - wall_before
        _expire_in(engine, unread.request, 0.2)
        queued_out = await _collect(queued)
        return cpu_s, wall_s, queued_out, await _collect(unread)

    cpu_s, wall_s, queued_out, unread_out = run_engine(body, num_slots=1, request_timeout_s=60)
    assert cpu_s < 0.25 * wall_s, f"{cpu_s:.2f} s of CPU in {wall_s:.2f} s while nothing could run"
    assert unread_out[-1].finish_reason == "timeout"
    assert queued_out[-1].finish_reason == "length"
