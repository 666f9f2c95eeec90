"""The engine against PEFT on the device and dtype a deployment uses: fp32 token for token;
bf16 against PEFT's own bf16 forward, teacher-forced (see `_agreement`).

`PREFIX_TEST_DEVICE` (cpu | cuda; default cpu) picks the device; `make gpu-check` runs this
file on CUDA. Without CUDA the cuda cases skip with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefix_store.entry import PrefixEntry, PrefixMeta
from prefix_store.fingerprint import prefix_spec_for
from prefix_store.format import parse_upload
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.kv_cache import KVLayout, SlotKVCache
from server.engine.model_loader import ModelOptions, load_model
from server.engine.precision import needs_fallback
from server.engine.request import Request, SamplingParams
from tests.tiny_models import MAX_POSITIONS, prompt_of_length, save_adapter, save_tiny_model

DEVICE = os.environ.get("PREFIX_TEST_DEVICE", "cpu")
ADAPTERS = [1, 4, 9]  # num_virtual_tokens: one mixed batch holds all three tasks
PEFT_TYPES = ["PREFIX_TUNING", "PREFIX_TUNING", "CARTRIDGE"]  # a Cartridge is served as a KV prefix too
LENGTHS = [3, 17, 40, 90, 8, 61]  # 90 and 61 are chunked across steps by the budget of 32
NEW_TOKENS = 12
# bf16 keeps 8 bits of mantissa: two honest bf16 forwards (ours batched and chunked, PEFT's one
# row at a time) round differently, so near-ties may flip. Where PEFT's bf16 top-2 margin is at
# least BF16_MARGIN logits, the tokens must agree; over all steps at least BF16_MIN_AGREEMENT.
BF16_MARGIN = 0.25
BF16_MIN_AGREEMENT = 0.9

pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="PREFIX_TEST_DEVICE=cuda but no CUDA device"
)


def _run_engine(kind: str, dtype: str, tmp_path) -> tuple[list[tuple[list[int], list[int], int]], object]:  # type: ignore[no-untyped-def]
    """Every prompt generated greedily in one mixed batch; (prompt, output, adapter index) each."""
    model_dir = save_tiny_model(kind, tmp_path / "model")
    loaded = load_model(ModelOptions(str(model_dir), DEVICE, dtype, tmp_path))
    spec = prefix_spec_for(loaded.model.config, loaded.dtype, MAX_POSITIONS)
    adapters = [
        save_adapter(model_dir, tmp_path / f"a{i}", n, seed=40 + i, peft_type=t)
        for i, (n, t) in enumerate(zip(ADAPTERS, PEFT_TYPES, strict=True))
    ]
    prefixes = [
        PrefixEntry(PrefixMeta(f"t{i}", 1, n, 0, dtype, "fp", "now"), parse_upload(spec, a.weights, a.config))
        for i, (n, a) in enumerate(zip(ADAPTERS, adapters, strict=True))
    ]
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, len(LENGTHS), MAX_POSITIONS,
                      loaded.dtype, loaded.device)  # fmt: skip
    core = EngineCore(loaded, SlotKVCache(layout), EngineConfig(max_queue=64, max_num_batched_tokens=32))
    requests = []
    for i, length in enumerate(LENGTHS):
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        requests.append(Request(prefixes[i % 3], prompt_of_length(length, 900 + i), params))
        core.add(requests[-1])
    while not core.is_idle:
        core.step()
    cases = [(r.prompt_ids, list(r.output_ids), i % 3) for i, r in enumerate(requests)]
    return cases, (model_dir, adapters)


def _reference(model_dir, adapter, dtype: torch.dtype) -> PeftModel:  # type: ignore[no-untyped-def]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEVICE)
    return PeftModel.from_pretrained(base, adapter.path).eval()


@torch.inference_mode()
def _agreement(model: PeftModel, prompt: list[int], output: list[int]) -> list[tuple[bool, float]]:
    """Teacher-forced: for each generated position, does PEFT's argmax given the prompt and our
    tokens before it pick our token; and PEFT's top-2 margin there. One forward of the whole
    sequence (causal): a flip does not cascade into the positions after it."""
    ids = torch.tensor([prompt + output], device=DEVICE)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # [new, vocab]
    top2 = torch.topk(logits, 2).values
    chosen = logits.argmax(-1).tolist()
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    return [(c == o, m) for c, o, m in zip(chosen, output, margins, strict=True)]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fp32_mixed_batch_matches_peft_token_for_token(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cases, (model_dir, adapters) = _run_engine(kind, "float32", tmp_path)
    for i, adapter in enumerate(adapters):
        model = _reference(model_dir, adapter, torch.float32)
        for prompt, output, task in cases:
            if task == i:
                assert all(ok for ok, _ in _agreement(model, prompt, output)), f"prompt of {len(prompt)}"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_mixed_batch_agrees_with_peft_bf16(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if (slow := needs_fallback(torch.bfloat16, DEVICE)) is not None:  # tiny shapes: seconds all the same
        print(f"bf16 on {DEVICE}: {slow.reason()}; tiny model, so bf16 anyway")
    cases, (model_dir, adapters) = _run_engine(kind, "bfloat16", tmp_path)
    steps: list[tuple[bool, float]] = []
    for i, adapter in enumerate(adapters):
        model = _reference(model_dir, adapter, torch.bfloat16)
        for prompt, output, task in cases:
            if task == i:
                steps += _agreement(model, prompt, output)
    clear = [ok for ok, margin in steps if margin >= BF16_MARGIN]
    rate = sum(ok for ok, _ in steps) / len(steps)
    print(f"bf16 {kind} on {DEVICE}: agreement {rate:.3f} over {len(steps)} steps; {len(clear)} clear")
    assert len(clear) >= len(steps) // 2 and all(clear)
    assert rate >= BF16_MIN_AGREEMENT
