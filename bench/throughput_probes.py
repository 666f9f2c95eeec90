"""Engine probes of `bench/throughput.py`, run inside mode D's process on its engine's model:

- `decode_mfu`: model FLOPs of a 64-row decode step / its time / the 2048^3 GEMM rate;
- `decode_step_over_gemm`: that decode step's time / the time of its own GEMMs alone, at the
  same shapes, over the same (cache-cold) weights: what the step adds around the matmuls;
- `long_prompt_interference`: 63 rows decoding, one 1,000-token prompt arrives; TPOT p99 / p50
  of the 63 over the steps around its prefill (chunked prefill keeps this near 1), and the
  longest step of its prefill over the median decode-only step (the stall one chunk causes).
"""

from __future__ import annotations

import time
from typing import Any

import torch


def timed(fn: Any) -> float:
    """Wall time of `fn()`, with the GPU's queued work included."""
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _best(fn: Any, repeats: int = 5) -> float:
    fn()
    return min(timed(fn) for _ in range(repeats))


def _decode_step(engine: Any, w: Any) -> tuple[Any, int]:
    """A step of `concurrency` decode rows at a mid-generation context: forward + sampling."""
    from server.engine.attention_plan import PlanRow
    from server.engine.model_runner import ForwardRow
    from server.engine.request import SamplingParams
    from server.engine.sampler import sample

    rows = w.concurrency
    context = w.prefix_len + (w.prompt_min + w.prompt_max) // 2 + w.new_tokens // 2
    pool = engine.core.kv.pool  # rows of `context` cached positions (no prefix) in the paged pool
    forward = []
    for i in range(rows):
        row_id = f"probe-{i}"
        pool.free(row_id)  # a probe called again reuses its rows
        assert pool.admit(row_id, None, None, 0, context + 1), "the bench pool is too small"
        forward.append(ForwardRow(PlanRow(None, pool.table(row_id), context, 1), [1]))
    params = [SamplingParams()] * rows
    return (lambda: sample(engine.core.runner.forward(forward), params, [None] * rows)), context


def decode_mfu(engine: Any, w: Any, gemm_rate: float, flops: dict[str, float]) -> float:
    step, context = _decode_step(engine, w)
    seconds = _best(step)
    work = w.concurrency * (flops["body"] + flops["head"] + flops["attention_per_position"] * (context + 1))
    return work / seconds / gemm_rate


def _gemms_alone(model: torch.nn.Module, rows: int) -> Any:
    """Every weight matmul of one forward of `rows` tokens, alone: each layer's own weights."""
    from transformers.pytorch_utils import Conv1D

    weights = []
    for module in model.modules():
        if isinstance(module, Conv1D):  # GPT-2 keeps [in, out]
            weights.append(module.weight)
        elif isinstance(module, torch.nn.Linear):
            weights.append(module.weight.t())
    inputs = {w.shape[0]: torch.randn(rows, w.shape[0], dtype=w.dtype, device=w.device) for w in weights}

    def run() -> None:
        with torch.inference_mode():
            for weight in weights:
                torch.mm(inputs[weight.shape[0]], weight)

    return run


def decode_step_over_gemm(engine: Any, w: Any) -> dict[str, float]:
    step, _ = _decode_step(engine, w)
    step_s = _best(step)
    gemm_s = _best(_gemms_alone(engine.loaded.model, w.concurrency))
    return {"decode_step_ms": 1000 * step_s, "decode_gemms_ms": 1000 * gemm_s, "ratio": step_s / gemm_s}


def long_prompt_interference(
    loaded: Any, prefix: Any, w: Any, long_len: int = 1000, budget: int = 512
) -> dict[str, Any]:
    """63 rows (`concurrency - 1`) decode; a `long_len`-token prompt arrives. Inter-token times of
    the decoding rows over 10 steps before it, the steps of its prefill and 10 after."""
    from server.engine.config import EngineConfig
    from server.engine.core import EngineCore
    from server.engine.kv_cache import KVLayout, SlotKVCache
    from server.engine.request import Request, SamplingParams

    spec_kv = prefix.kv
    layout = KVLayout(spec_kv.shape[0], spec_kv.shape[2], spec_kv.shape[4], w.concurrency,
                      w.prefix_len + long_len + 64, loaded.dtype, loaded.device)  # fmt: skip
    core = EngineCore(
        loaded, SlotKVCache(layout), EngineConfig(max_queue=1000, max_num_batched_tokens=budget)
    )
    params = SamplingParams(max_new_tokens=120, ignore_eos=True)  # they decode the whole window
    decoding = [Request(prefix, [1 + (i % 50)] * w.prompt_min, params) for i in range(w.concurrency - 1)]
    for request in decoding:
        core.add(request)
    while any(not r.output_ids for r in decoding):
        core.step()
    gaps: list[float] = []
    steps: dict[bool, list[float]] = {True: [], False: []}  # is the long prompt prefilling: step times

    def timed_step(is_prefilling: bool) -> None:
        started = time.perf_counter()
        outputs = core.step()
        seconds = time.perf_counter() - started
        gaps.extend([seconds] * sum(o.request_id != long.request_id for o in outputs))
        steps[is_prefilling].append(seconds)

    long = Request(prefix, [2] * long_len, SamplingParams(max_new_tokens=1, ignore_eos=True))
    for _ in range(10):
        timed_step(False)
    core.add(long)
    prefill_steps = 0
    while not long.output_ids:
        timed_step(True)
        prefill_steps += 1
    for _ in range(10):
        timed_step(False)
    ordered = sorted(gaps)
    p50, p99 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    decode_p50 = sorted(steps[False])[len(steps[False]) // 2]
    return {"tpot_p50_ms": 1000 * p50, "tpot_p99_ms": 1000 * p99, "ratio": p99 / p50,
            "prefill_steps": prefill_steps, "budget": core.config.max_num_batched_tokens,
            "max_step_over_decode_step": max(steps[True]) / decode_p50,
            "prefill_step_p50_over_decode_step": sorted(steps[True])[len(steps[True]) // 2] / decode_p50}  # fmt: skip
