"""EngineCore against the PEFT oracle with no server, no thread and no event loop: prompts longer
than the token budget are chunked across steps while other rows decode in the same forwards."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prefix_store.entry import PrefixEntry, PrefixMeta
from prefix_store.fingerprint import prefix_spec_for
from prefix_store.format import parse_upload
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.kv_cache import KVLayout, SlotKVCache
from server.engine.model_loader import LoadedModel, ModelOptions, load_model
from server.engine.request import Request, SamplingParams, StepOutput
from server.engine.sampler import make_generator
from tests.tiny_models import MAX_POSITIONS, Oracle, save_adapter, save_tiny_model, unambiguous_case

ADAPTERS = [1, 4, 9]  # num_virtual_tokens
BUDGET = 24  # tokens per step: every long prompt below needs several steps
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp(request.param)
    model_dir = save_tiny_model(request.param, root / "model")
    loaded = load_model(ModelOptions(str(model_dir), "cpu", "float32", root))
    spec = prefix_spec_for(loaded.model.config, torch.float32, MAX_POSITIONS)
    prefixes, oracles = [], []
    for i, n in enumerate(ADAPTERS):
        adapter = save_adapter(model_dir, root / f"adapter{i}", n, seed=20 + i)
        kv = parse_upload(spec, adapter.weights, adapter.config)
        prefixes.append(PrefixEntry(PrefixMeta(f"t{i}", 1, n, 0, "float32", "fp", "now"), kv))
        oracles.append(Oracle(model_dir, adapter))
    return loaded, spec, prefixes, oracles


def _core(loaded: LoadedModel, spec, num_slots: int, budget: int | None) -> EngineCore:  # type: ignore[no-untyped-def]
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, num_slots, MAX_POSITIONS,
                      torch.float32, torch.device("cpu"))  # fmt: skip
    return EngineCore(loaded, SlotKVCache(layout), EngineConfig(max_queue=64, max_num_batched_tokens=budget))


def _request(prefix: PrefixEntry, prompt: list[int], tenant: str = "t") -> Request:
    request = Request(prefix, prompt, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    request.tenant = tenant
    return request


def _run(core: EngineCore, outputs: dict[str, list[int]], steps: int | None = None) -> None:
    for _ in range(steps if steps is not None else 1000):
        if core.is_idle:
            return
        for output in core.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)


def test_long_prompts_chunked_among_decoding_rows_match_peft(setup) -> None:  # type: ignore[no-untyped-def]
    loaded, spec, prefixes, oracles = setup
    lengths = [2, 5, 11, 90, 23, 150, 1, 61]  # 90, 150 and 61 need 4, 7 and 3 steps of prefill
    cases = []
    for i, length in enumerate(lengths):
        task = i % len(prefixes)
        prompt, expected = unambiguous_case(oracles[task], length, 500 * (i + 1), MAX_NEW_TOKENS, 1e-3)
        cases.append((_request(prefixes[task], prompt), expected))
    core = _core(loaded, spec, num_slots=6, budget=BUDGET)
    outputs: dict[str, list[int]] = {}
    for request, _ in cases[:3]:  # three short rows start decoding...
        core.add(request)
    _run(core, outputs, steps=2)
    assert all(len(outputs[r.request_id]) >= 1 for r, _ in cases[:3])
    for request, _ in cases[3:]:  # ...then long prompts arrive and are prefilled in chunks beside them
        core.add(request)
    chunked_steps = 0
    while not core.is_idle:
        batch_before = {r.request_id for r in core.scheduler.running}
        _run(core, outputs, steps=1)
        decoding = [r for r, _ in cases if r.request_id in batch_before and r.output_ids]
        prefilling = [r for r, _ in cases if r.request_id in batch_before and not r.output_ids]
        chunked_steps += bool(decoding and prefilling)
    assert chunked_steps >= 3  # decode and chunked prefill really shared forwards
    for request, expected in cases:
        assert outputs[request.request_id] == expected, f"prompt of {len(request.prompt_ids)}"


def test_every_step_stays_within_the_budget(setup) -> None:  # type: ignore[no-untyped-def]
    loaded, spec, prefixes, oracles = setup
    core = _core(loaded, spec, num_slots=4, budget=BUDGET)
    seen: list[int] = []
    real_forward = core.runner.forward

    def counting(rows):  # type: ignore[no-untyped-def]
        seen.append(sum(len(r.token_ids) for r in rows))
        return real_forward(rows)

    core.runner.forward = counting  # type: ignore[method-assign]
    for i, length in enumerate([100, 3, 70, 9]):
        core.add(_request(prefixes[i % 3], [5 + i] * length))
    _run(core, {})
    assert max(seen) <= BUDGET and seen[0] == BUDGET


def test_no_thread_no_loop_abort_and_outputs(setup) -> None:  # type: ignore[no-untyped-def]
    loaded, spec, prefixes, _ = setup
    core = _core(loaded, spec, num_slots=2, budget=BUDGET)
    keep, drop = _request(prefixes[0], [7, 8, 9]), _request(prefixes[1], [10] * 40)
    core.add(keep)
    core.add(drop)
    first: list[StepOutput] = core.step()
    assert [o.request_id for o in first] == [keep.request_id]  # `drop` is still prefilling
    core.abort(drop.request_id)
    outputs: dict[str, list[int]] = {}
    _run(core, outputs)
    assert drop.finish_reason == "abort" and drop.request_id not in outputs
    assert keep.finish_reason == "length" and len(outputs[keep.request_id]) == MAX_NEW_TOKENS - 1
    assert core.is_idle and core.scheduler.running == []


def test_a_preempted_row_resumes_with_the_same_tokens(setup) -> None:  # type: ignore[no-untyped-def]
    """A tenant holding every slot gives one back within a step when another tenant arrives; the
    preempted row is recomputed later and ends with exactly the tokens it would have had alone
    (greedy and seeded sampling alike)."""
    loaded, spec, prefixes, _ = setup
    sampled = SamplingParams(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)

    def hog_requests() -> list[Request]:
        rows = [_request(prefixes[0], [9, 8, 7], "hog"), _request(prefixes[1], [4, 5, 6, 7], "hog")]
        rows[1].params = sampled
        rows[1].generator = make_generator(sampled, torch.device("cpu"))
        for row in rows:
            row.params = dataclasses.replace(row.params, max_new_tokens=30)
        return rows

    alone: dict[str, list[int]] = {}
    solo = _core(loaded, spec, num_slots=2, budget=BUDGET)
    solo_rows = hog_requests()
    for row in solo_rows:
        solo.add(row)
    _run(solo, alone)

    core = _core(loaded, spec, num_slots=2, budget=BUDGET)
    outputs: dict[str, list[int]] = {}
    hog = hog_requests()
    for row in hog:
        core.add(row)
    _run(core, outputs, steps=5)
    small = _request(prefixes[2], [3, 3], "small")
    core.add(small)
    _run(core, outputs, steps=1)
    assert hog[1].request_id not in {r.request_id for r in core.scheduler.running}  # preempted
    assert len(outputs[small.request_id]) == 1  # started at once, not after the hog's 30 tokens
    _run(core, outputs)
    for row, solo_row in zip(hog, solo_rows, strict=True):
        assert outputs[row.request_id] == alone[solo_row.request_id]
        assert len(outputs[row.request_id]) == 30
