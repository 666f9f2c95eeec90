"""EngineCore over the paged pool, against the PEFT oracle (fp32, token for token): rows of one
task share one copy of its prefix; a new version replaces the old one while old rows finish
exactly; preemption under block pressure resumes rows with the same tokens; the pool is all
free at the end of every test."""

from __future__ import annotations

import pytest
import torch

from prefix_store.entry import PrefixEntry, PrefixMeta, PrefixSpec
from prefix_store.fingerprint import prefix_spec_for
from prefix_store.format import parse_upload
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.kv_cache import KVLayout, PagedKVCache
from server.engine.model_loader import LoadedModel, ModelOptions, load_model
from server.engine.request import Request, SamplingParams
from server.engine.stats import StepStats
from tests.tiny_models import MAX_POSITIONS, Oracle, save_adapter, save_tiny_model, unambiguous_case

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("paged")
    model_dir = save_tiny_model("llama", root / "model")
    loaded = load_model(ModelOptions(str(model_dir), "cpu", "float32", root))
    spec = prefix_spec_for(loaded.model.config, torch.float32, MAX_POSITIONS)
    versions = []
    for version, length in ((1, 21), (2, 9)):  # 21: longer than a block, not a multiple of it
        adapter = save_adapter(model_dir, root / f"v{version}", length, seed=40 + version)
        kv = parse_upload(spec, adapter.weights, adapter.config)
        meta = PrefixMeta("acme:t", version, length, 0, "float32", "fp", "now")
        versions.append((PrefixEntry(meta, kv), Oracle(model_dir, adapter)))
    return loaded, spec, versions


def _core(
    loaded: LoadedModel, spec: PrefixSpec, num_rows: int, num_blocks: int | None = None, budget: int = 64
) -> EngineCore:
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, num_rows, MAX_POSITIONS,
                      torch.float32, torch.device("cpu"), num_blocks=num_blocks)  # fmt: skip
    return EngineCore(
        loaded, PagedKVCache(layout), EngineConfig(max_queue=256, max_num_batched_tokens=budget)
    )


def _request(prefix: PrefixEntry, prompt: list[int]) -> Request:
    return Request(prefix, prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))


def _case(entry: PrefixEntry, oracle: Oracle, length: int, seed: int) -> tuple[Request, list[int]]:
    prompt, expected = unambiguous_case(oracle, length, seed, NEW_TOKENS, 1e-3)
    return _request(entry, prompt), expected


def _run(core: EngineCore, outputs: dict[str, list[int]]) -> None:
    for output in core.step():
        outputs.setdefault(output.request_id, []).extend(output.token_ids)


def _assert_all_free(core: EngineCore) -> None:
    pool = core.kv.pool
    stats = pool.stats()
    assert stats.num_row_blocks == 0 and stats.num_prefix_refs == 0
    pool.evict_idle()
    assert pool.stats().num_free_blocks == pool.stats().num_blocks


def test_rows_of_a_task_share_one_copy_of_its_prefix_and_match_peft(setup) -> None:  # type: ignore[no-untyped-def]
    loaded, spec, versions = setup
    entry, oracle = versions[0]
    cases = [unambiguous_case(oracle, 3 + i, 100 + i, NEW_TOKENS, 1e-3) for i in range(8)] * 8
    core = _core(loaded, spec, num_rows=64, budget=512)
    requests = [_request(entry, prompt) for prompt, _ in cases]
    for request in requests:
        core.add(request)
    outputs: dict[str, list[int]] = {}
    peak = 0
    while not core.is_idle:
        _run(core, outputs)
        stats = core.kv.pool.stats()
        if stats.num_prefix_refs > peak:
            peak = stats.num_prefix_refs
            own = sum(len(core.kv.pool.table(r.request_id)) for r in core.scheduler.running)
            assert (stats.num_resident_prefixes, stats.num_prefix_blocks) == (1, 2)  # 21 positions: 2 blocks
            assert stats.num_row_blocks == own  # each row holds only its own tokens' blocks
    assert peak == 64
    assert [outputs[r.request_id] for r in requests] == [expected for _, expected in cases]
    _assert_all_free(core)


def test_a_new_version_keeps_old_rows_exact_and_frees_the_old_blocks(setup) -> None:  # type: ignore[no-untyped-def]
    loaded, spec, versions = setup
    (v1, oracle1), (v2, oracle2) = versions
    core = _core(loaded, spec, num_rows=8)
    old = [_case(v1, oracle1, 4 + i, 300 + i) for i in range(4)]  # 4 rows: attended as a group
    new = [_case(v2, oracle2, 4 + i, 400 + i) for i in range(4)]
    outputs: dict[str, list[int]] = {}
    for request, _ in old:
        core.add(request)
    _run(core, outputs)
    _run(core, outputs)
    for request, _ in new:  # the task is re-uploaded while its old rows decode
        core.add(request)
    _run(core, outputs)
    prefixes = {id(core.kv.pool.prefix_of(r.request_id)) for r in core.scheduler.running}
    assert len(prefixes) == 2 and core.kv.pool.stats().num_prefix_blocks == 2 + 1
    while not core.is_idle:
        _run(core, outputs)
    assert [outputs[r.request_id] for r, _ in old + new] == [e for _, e in old + new]
    assert core.kv.pool.stats().num_prefix_blocks == 1  # the old version's 2 blocks went back
    _assert_all_free(core)


def test_preemption_under_block_pressure_resumes_with_the_same_tokens(setup) -> None:  # type: ignore[no-untyped-def]
    loaded, spec, versions = setup
    entry, oracle = versions[0]
    cases = [unambiguous_case(oracle, 14 + i % 2, 500 + i % 2, NEW_TOKENS, 1e-3) for i in range(6)]
    # 2 prefix blocks + 6 rows needing 2 blocks each at the end: 10 usable blocks is not enough
    core = _core(loaded, spec, num_rows=6, num_blocks=11)
    steps: list[StepStats] = []
    core.on_step = steps.append
    requests = [_request(entry, prompt) for prompt, _ in cases]
    for request in requests:
        core.add(request)
    outputs: dict[str, list[int]] = {}
    preempted = set()
    while not core.is_idle:
        _run(core, outputs)
        preempted |= {r.request_id for r in core.scheduler.waiting if r.output_ids}
    assert preempted  # rows went back to the queue with tokens generated...
    assert sum(s.num_preempted_for_blocks for s in steps) >= len(preempted)  # ...reported by cause
    assert sum(s.num_preempted_for_fairness for s in steps) == 0  # one tenant: never for fairness
    assert [outputs[r.request_id] for r in requests] == [expected for _, expected in cases]  # ...and resumed
    _assert_all_free(core)
