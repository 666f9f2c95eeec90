"""Sampling penalties against references: transformers' `RepetitionPenaltyLogitsProcessor` and a
straightforward implementation of OpenAI's frequency/presence formula, row by row, in batches
where other rows have none; through the sampler alone and through EngineCore with a tiny model."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from prefix_store.entry import PrefixEntry, PrefixMeta
from prefix_store.fingerprint import prefix_spec_for
from prefix_store.format import parse_upload
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.kv_cache import KVLayout, SlotKVCache
from server.engine.model_loader import ModelOptions, load_model
from server.engine.penalties import PenaltyTable
from server.engine.request import Request, SamplingParams
from server.engine.sampler import filter_probs, make_generator, sample, token_logprobs
from tests.tiny_models import MAX_POSITIONS, Oracle, prompt_of_length, save_adapter, save_tiny_model

CPU = torch.device("cpu")
FREQ = SamplingParams(frequency_penalty=1.5, presence_penalty=0.5)
REP = SamplingParams(repetition_penalty=1.8)
ALL = SamplingParams(frequency_penalty=0.7, presence_penalty=-0.3, repetition_penalty=1.3)
NEGATIVE = SamplingParams(frequency_penalty=-1.0, repetition_penalty=0.6)  # rewards repeating


def reference(
    logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """One row's penalised logits `[vocab]`: HF's processor over prompt + output, then OpenAI's
    `mu[j] - c[j] * frequency - float(c[j] > 0) * presence` over the output."""
    scores = logits[None].clone()
    if params.repetition_penalty != 1.0 and prompt + output:
        processor = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
        scores = processor(torch.tensor([prompt + output]), scores)
    scores = scores[0]
    for token, count in Counter(output).items():
        scores[token] = (
            scores[token] - count * params.frequency_penalty - float(count > 0) * params.presence_penalty
        )
    return scores


# ---- the sampler alone ---------------------------------------------------------------------


def _histories(vocab: int, num_rows: int) -> list[tuple[list[int], list[int]]]:
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randint(0, vocab, (5 + 3 * i,), generator=generator).tolist(),
         torch.randint(0, vocab, (2 * i,), generator=generator).tolist())
        for i in range(num_rows)
    ]  # fmt: skip


def test_apply_equals_the_references_row_by_row() -> None:
    vocab, params = 40, [SamplingParams(), FREQ, REP, SamplingParams(temperature=0.7), ALL, NEGATIVE]
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(1)) * 3
    histories = _histories(vocab, len(params))
    table = PenaltyTable(num_slots=8, vocab=vocab, device=CPU)
    slots = [7, 2, 5, 0, 1, 4]  # rows sample from slots in any order
    for (prompt, output), slot, p in zip(histories, slots, params, strict=True):
        if p.has_penalties:
            table.load(slot, prompt, output)
    step = table.for_step(params, slots)
    assert step is not None
    raw = logits.clone()
    penalised = step.apply(logits)  # [penalised rows, vocab]
    assert step.row_list == [row for row, p in enumerate(params) if p.has_penalties]
    assert torch.equal(logits, raw)  # the raw logits stay for the logprobs
    for j, row in enumerate(step.row_list):
        prompt, output = histories[row]
        expected = reference(logits[row], params[row], prompt, output)
        torch.testing.assert_close(penalised[j], expected, rtol=0, atol=1e-5)
        assert not torch.equal(penalised[j], logits[row])


def test_no_penalised_row_costs_nothing() -> None:
    table = PenaltyTable(num_slots=4, vocab=10, device=CPU)
    assert table.for_step([SamplingParams(), SamplingParams(temperature=1.0)], [0, 1]) is None


def test_greedy_steps_follow_the_reference_and_count_on_the_device() -> None:
    """Several steps of the batched sampler: each penalised row picks the argmax of its reference
    logits given everything it picked so far; the unpenalised rows pick the plain argmax."""
    vocab, params = 12, [SamplingParams(), FREQ, REP, ALL]
    base = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(5))
    prompts = [[1, 2, 3], [4, 4, 5], [int(base[2].argmax()), 6], [7]]
    table = PenaltyTable(num_slots=4, vocab=vocab, device=CPU)
    for slot, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        if p.has_penalties:
            table.load(slot, prompt, [])
    outputs: list[list[int]] = [[] for _ in params]
    for _ in range(15):  # the same logits every step: only the penalties move the choice
        chosen = sample(base, params, [None] * len(params), table.for_step(params, [0, 1, 2, 3]))
        for row, p in enumerate(params):
            expected = (
                reference(base[row], p, prompts[row], outputs[row]).argmax()
                if p.has_penalties
                else base[row].argmax()
            )
            assert chosen[row] == int(expected)
            outputs[row].append(chosen[row])
    assert len(set(outputs[1])) > 3 and len(set(outputs[0])) == 1  # the frequency penalty rotated
    for slot in (1, 2, 3):
        assert (
            table._tables()[0][slot].tolist()
            == torch.bincount(torch.tensor(outputs[slot]), minlength=vocab).tolist()
        )


def test_a_seeded_penalised_row_samples_like_its_reference_and_logprobs_stay_raw() -> None:
    vocab = 30
    target = SamplingParams(
        temperature=0.9, top_k=20, seed=11, logprobs=2, frequency_penalty=2.0, repetition_penalty=1.5
    )
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(seed=1), target, SamplingParams(temperature=1.0, seed=3)]
    table = PenaltyTable(num_slots=3, vocab=vocab, device=CPU)
    prompt = [0, 1, 2]
    table.load(1, prompt, [])
    generators = [make_generator(p, CPU) for p in params]
    alone = make_generator(target, CPU)
    output: list[int] = []
    for _ in range(12):
        chosen = sample(logits, params, generators, table.for_step(params, [0, 1, 2]))
        probs = filter_probs(reference(logits[1], target, prompt, output)[None], [target])[0]
        assert chosen[1] == int(torch.multinomial(probs, 1, generator=alone))
        logprob, top = token_logprobs(logits, chosen, params)[1] or (None, ())
        raw = torch.log_softmax(logits[1], dim=-1)  # vLLM's default: the model's own distribution
        assert logprob == pytest.approx(float(raw[chosen[1]]), abs=1e-6)
        assert [t for t, _ in top] == torch.topk(raw, 2).indices.tolist()
        output.append(chosen[1])


def test_invalid_penalties_are_refused() -> None:
    bad_values = [
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"frequency_penalty": float("nan")},
        {"presence_penalty": float("inf")},
    ]
    for bad in bad_values:
        with pytest.raises(ValueError):
            SamplingParams(**bad)  # type: ignore[arg-type]


# ---- through EngineCore with a tiny model ----------------------------------------------------

MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("penalties")
    model_dir = save_tiny_model("gpt2", root / "model")
    loaded = load_model(ModelOptions(str(model_dir), "cpu", "float32", root))
    spec = prefix_spec_for(loaded.model.config, torch.float32, MAX_POSITIONS)
    adapter = save_adapter(model_dir, root / "adapter", 4, seed=30)
    kv = parse_upload(spec, adapter.weights, adapter.config)
    prefix = PrefixEntry(PrefixMeta("t", 1, 4, 0, "float32", "fp", "now"), kv)
    return loaded, spec, prefix, Oracle(model_dir, adapter)


@torch.inference_mode()
def reference_run(oracle: Oracle, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
    """Full forwards of PEFT's model with the reference penalties: the ids and, for a greedy row,
    the smallest top-2 margin of the penalised logits (so an equality is not luck)."""
    ids, output, margin = list(prompt), [], float("inf")
    generator = make_generator(params, CPU)
    for _ in range(params.max_new_tokens):
        raw = oracle.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        scores = reference(raw, params, prompt, output)
        if params.is_greedy:
            top2 = torch.topk(scores, 2).values
            margin = min(margin, float(top2[0] - top2[1]))
            token = int(scores.argmax())
        else:
            token = int(torch.multinomial(filter_probs(scores[None], [params])[0], 1, generator=generator))
        ids.append(token)
        output.append(token)
    return output, margin


def _core(tiny, num_slots: int) -> EngineCore:  # type: ignore[no-untyped-def]
    loaded, spec, _, _ = tiny
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, num_slots, MAX_POSITIONS,
                      torch.float32, CPU)  # fmt: skip
    return EngineCore(loaded, SlotKVCache(layout), EngineConfig(max_queue=16, max_num_batched_tokens=16))


def _request(tiny, prompt: list[int], params: SamplingParams, tenant: str = "t") -> Request:  # type: ignore[no-untyped-def]
    request = Request(tiny[2], prompt, dataclasses.replace(params, ignore_eos=True))
    request.generator = make_generator(request.params, CPU)
    request.tenant = tenant
    return request


def _run(core: EngineCore, outputs: dict[str, list[int]], steps: int = 1000) -> None:
    for _ in range(steps):
        if core.is_idle:
            return
        for output in core.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)


def test_mixed_batch_matches_the_reference_row_by_row(tiny) -> None:  # type: ignore[no-untyped-def]
    """Rows with and without penalties share steps; the short unpenalised row leaves first, so
    penalised rows are compacted into its slot; a late row is admitted while others decode; a
    long prompt is prefilled in chunks. Every row equals its reference."""
    oracle = tiny[3]
    n = MAX_NEW_TOKENS
    cases = [
        (prompt_of_length(6, 1), SamplingParams(max_new_tokens=3)),
        (prompt_of_length(9, 2), dataclasses.replace(FREQ, max_new_tokens=n)),
        (prompt_of_length(40, 3), dataclasses.replace(REP, max_new_tokens=n)),
        (prompt_of_length(5, 4), dataclasses.replace(ALL, max_new_tokens=n, temperature=0.8, seed=5)),
        (prompt_of_length(7, 5), SamplingParams(max_new_tokens=n)),
        (prompt_of_length(8, 6), dataclasses.replace(NEGATIVE, max_new_tokens=n)),
    ]
    core = _core(tiny, num_slots=6)
    requests = [_request(tiny, prompt, params) for prompt, params in cases]
    moved: list[tuple[int, int]] = []
    real_move = core.penalties.move
    core.penalties.move = lambda src, dst: (moved.append((src, dst)), real_move(src, dst))[1]  # type: ignore[method-assign]
    outputs: dict[str, list[int]] = {}
    for request in requests[:5]:
        core.add(request)
    _run(core, outputs, steps=3)
    core.add(requests[5])
    _run(core, outputs)
    changed = 0
    for request, (prompt, params) in zip(requests, cases, strict=True):
        expected, margin = reference_run(oracle, prompt, params)
        assert margin > 1e-3
        assert outputs[request.request_id] == expected, params
        plain, _ = reference_run(oracle, prompt, dataclasses.replace(params, frequency_penalty=0.0,
                                 presence_penalty=0.0, repetition_penalty=1.0))  # fmt: skip
        changed += params.has_penalties and plain != expected
    assert changed >= 3  # the penalties really changed what the rows wrote
    assert moved  # a penalised row's history followed it to another slot


def test_a_preempted_penalised_row_resumes_with_its_history(tiny) -> None:  # type: ignore[no-untyped-def]
    """A preempted row loses its slot; when it is admitted again its history is rebuilt from what
    it generated, so it ends exactly as its reference."""
    params = dataclasses.replace(ALL, max_new_tokens=20)
    core = _core(tiny, num_slots=2)
    hog = [_request(tiny, prompt_of_length(4, 7), SamplingParams(max_new_tokens=20), "hog"),
           _request(tiny, prompt_of_length(6, 8), params, "hog")]  # fmt: skip
    outputs: dict[str, list[int]] = {}
    for request in hog:
        core.add(request)
    _run(core, outputs, steps=6)
    core.add(_request(tiny, [3, 3], SamplingParams(max_new_tokens=2), "small"))
    _run(core, outputs, steps=1)
    assert hog[1] not in core.scheduler.running  # preempted after some tokens
    assert 0 < len(outputs[hog[1].request_id]) < 20
    _run(core, outputs)
    expected, margin = reference_run(tiny[3], hog[1].prompt_ids, params)
    assert margin > 1e-3 and outputs[hog[1].request_id] == expected
