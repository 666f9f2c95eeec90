"""The paged-engine modes and probes of `bench/throughput.py` (issue 26, Engine v3):

- D256: mode D's requests with 4x the streams (256 over the 64 tasks: every request at once);
  its roofline is D's (the GEMM rate over the workload's FLOPs per generated token).
- SP (shared prefix): 16 tasks of 256-position prefixes, 16 streams a task; besides tokens/s,
  the KV bytes the pool holds per running row (its own blocks plus the shared prefix blocks of
  the rows' tasks, over the rows) against the bytes of the rows' own tokens, at the step with the
  most rows running (and the mean over steps, ramp and drain included).
- capacity (in D256's process): a KV budget of what the slot layout needed for 16 rows of 2,048
  positions; more D requests offered than fit; the most rows running at once, over 16.
- grouped attention (in SP's process): 64 decode rows of one task, 512-position prefix, 64 own
  tokens each; the real attention code with the prefix read once by the group, and per row.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import throughput_modes as modes  # noqa: E402
from throughput_probes import timed  # noqa: E402

SP_TASKS, SP_PREFIX_LEN, SP_STREAMS_PER_TASK = 16, 256, 16
SLOT_ROWS, SLOT_MAX_LEN = 16, 2048  # the capacity budget: what the slot layout needed for 16 rows


def d256_workload(w: Any) -> Any:
    """D's requests (at least one a stream), 4x the streams: all of them at once."""
    streams = 4 * w.concurrency
    return dataclasses.replace(w, concurrency=streams, num_requests=max(w.num_requests, streams))


def sp_workload(w: Any) -> Any:
    """SP's shape, the smoke's too (on its tiny model it takes a second): one request a stream."""
    streams = SP_TASKS * SP_STREAMS_PER_TASK
    return dataclasses.replace(w, num_tasks=SP_TASKS, prefix_len=SP_PREFIX_LEN, concurrency=streams,
                               num_requests=streams)  # fmt: skip


def _num_blocks(w: Any) -> int:
    """Every stream's longest row and every task's prefix at once, the zero block: no preemption,
    and no more memory than that (the default layout's `max_len` rows would take twice as much)."""
    from server.engine.kv_cache import BLOCK_SIZE

    per_row, per_prefix = -(-(w.prompt_max + w.new_tokens) // BLOCK_SIZE), -(-w.prefix_len // BLOCK_SIZE)
    return w.concurrency * per_row + w.num_tasks * per_prefix + 1


def engine_mixed_256(w: Any, workdir: Path) -> dict[str, Any]:
    """Mode D256, then the capacity probe."""
    w256 = d256_workload(w)
    engine, prefixes = modes._engine(w256, workdir, num_blocks=_num_blocks(w256))
    result = modes.serve(w256, engine, prefixes, modes.requests(w256))
    loaded = engine.loaded
    del engine  # its pool goes before the probe allocates another
    started = time.perf_counter()
    result["capacity"] = capacity(w, loaded, prefixes)
    print(f"  capacity: {time.perf_counter() - started:.1f} s", flush=True)
    return result


def _random_prefixes(w: Any, spec: Any) -> list[Any]:
    """`num_tasks` prefixes of `prefix_len` positions (random K/V: SP measures memory and speed)."""
    from prefix_store.entry import PrefixEntry, PrefixMeta

    shape = (spec.num_layers, 2, spec.num_kv_heads, w.prefix_len, spec.head_dim)
    generator = torch.Generator().manual_seed(3)
    return [
        PrefixEntry(PrefixMeta(f"sp{t}", 1, w.prefix_len, 0, w.dtype, "", ""),
                    (0.5 * torch.randn(shape, generator=generator)).to(modes.DTYPES[w.dtype]))
        for t in range(w.num_tasks)
    ]  # fmt: skip


def engine_shared_prefix(w: Any, workdir: Path) -> dict[str, Any]:
    """Mode SP, then the grouped-attention probe."""
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.kv_cache import PagedKVCache

    wsp = sp_workload(w)
    loaded, spec = modes.load(wsp, workdir)
    kv = PagedKVCache(modes.kv_layout(wsp, loaded, spec, _num_blocks(wsp)))
    steps: list[tuple[int, int, int]] = []  # after each step: rows, positions held for them, own positions

    def on_step(_: Any) -> None:  # in the engine thread, after the step's rows retired
        stats = kv.pool.stats()
        running = engine.core.scheduler.running
        own = sum(engine.core.scheduler.num_computed(r) for r in running)
        steps.append((len(running), stats.num_used_blocks * stats.block_size, own))

    engine = Engine(loaded, kv, EngineConfig(max_queue=100_000), on_step=on_step)
    result = modes.serve(wsp, engine, _random_prefixes(wsp, spec), modes.requests(wsp))
    peak = max(steps)  # the most rows (then the most held): the batch full
    result["kv_per_row_over_own"] = peak[1] / peak[2]
    result["kv_per_row_over_own_mean"] = sum(s[1] for s in steps) / sum(s[2] for s in steps)
    result["peak_rows"] = peak[0]
    started = time.perf_counter()
    result["grouped_attention"] = grouped_attention(loaded, spec, w)
    print(f"  grouped attention: {time.perf_counter() - started:.1f} s", flush=True)
    return result


def capacity(w: Any, loaded: Any, prefixes: list[Any], patience: int = 8) -> dict[str, Any]:
    """Offer D requests to a pool of what the slot layout needed for 16 rows of `SLOT_MAX_LEN`
    positions (rows unbounded otherwise); step until rows stop being added for `patience` steps
    or begin to leave (finished or preempted) and count the most running at once."""
    from server.engine.config import EngineConfig
    from server.engine.core import EngineCore
    from server.engine.kv_cache import KVLayout, PagedKVCache
    from server.engine.request import Request, SamplingParams

    kv0 = prefixes[0].kv  # [layers, 2, kv_heads, P, head_dim]
    layout = KVLayout(kv0.shape[0], kv0.shape[2], kv0.shape[4], 1 << 16, SLOT_MAX_LEN, loaded.dtype,
                      loaded.device, num_blocks=1)  # fmt: skip
    budget = SLOT_ROWS * layout.bytes_per_position * SLOT_MAX_LEN
    layout = dataclasses.replace(layout, num_blocks=budget // layout.bytes_per_block)
    core = EngineCore(loaded, PagedKVCache(layout), EngineConfig(max_queue=1 << 20))
    offered = dataclasses.replace(w, num_requests=layout.total_blocks)  # > rows the pool can hold
    params = SamplingParams(max_new_tokens=w.new_tokens, ignore_eos=True)
    for task, prompt in modes.requests(offered):
        core.add(Request(prefixes[task], prompt, params))
    core.step()  # takes the requests in (they are messages until a step) and starts the first rows
    peak, steps, last_growth = 0, 1, 0
    while core.scheduler.waiting and len(core.scheduler.running) >= peak and steps - last_growth < patience:
        if len(core.scheduler.running) > peak:
            peak, last_growth = len(core.scheduler.running), steps
        core.step()
        steps += 1
    return {"kv_budget_bytes": budget, "peak_rows": peak, "steps": steps,
            "offered": offered.num_requests, "ratio": peak / SLOT_ROWS}  # fmt: skip


def grouped_attention(loaded: Any, spec: Any, w: Any, rows: int = 64, prefix_len: int = 512,
                      own: int = 64) -> dict[str, Any]:  # fmt: skip
    """One layer's attention for `rows` decode rows of one task (server/engine/attention.py),
    the prefix read by the group vs by each row; the same pool, queries and plan rows."""
    from prefix_store.entry import PrefixMeta
    from server.engine.attention import step_attention_forward
    from server.engine.attention_plan import PlanRow, prepare
    from server.engine.kv_cache import KVLayout, PagedKVCache

    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, rows, own + 1, loaded.dtype,
                      loaded.device, num_blocks=rows * (own // 16 + 1) + prefix_len // 16 + 2)  # fmt: skip
    kv = PagedKVCache(layout)
    source = torch.empty(0)  # never copied: the probe fills the pool with random K/V below
    meta = PrefixMeta("probe:task", 1, prefix_len, 0, str(loaded.dtype).removeprefix("torch."), "", "")
    plan_rows = []
    for i in range(rows):
        assert kv.pool.admit(f"r{i}", meta, source, prefix_len, own + 1)
        plan_rows.append(PlanRow(kv.pool.prefix_of(f"r{i}"), kv.pool.table(f"r{i}"), own, 1))
    generator = torch.Generator().manual_seed(5)
    key, value = (torch.randn(kv.keys[0].shape, generator=generator).to(loaded.dtype) for _ in range(2))
    heads = loaded.model.config.num_attention_heads
    q = torch.randn(rows, heads, spec.head_dim, generator=generator).to(loaded.dtype)
    scale = spec.head_dim**-0.5
    device = torch.device(loaded.device)
    grouped = prepare(plan_rows, layout.block_size, device, min_group_rows=2)
    per_row = prepare(plan_rows, layout.block_size, device, min_group_rows=rows + 1)
    assert grouped.has_groups and not per_row.has_groups
    out_g = step_attention_forward(grouped, q, key, value, scale)
    out_r = step_attention_forward(per_row, q, key, value, scale)
    times = {"grouped": [], "per_row": []}  # interleaved: the machine's load hits both alike
    for _ in range(w.probe_repeats):
        times["grouped"].append(timed(lambda: step_attention_forward(grouped, q, key, value, scale)))
        times["per_row"].append(timed(lambda: step_attention_forward(per_row, q, key, value, scale)))
    best = {k: sorted(v)[len(v) // 2] for k, v in times.items()}  # medians
    return {"rows": rows, "prefix_len": prefix_len, "own": own, "grouped_ms": 1000 * best["grouped"],
            "per_row_ms": 1000 * best["per_row"], "max_abs_diff": float((out_g - out_r).abs().max()),
            "ratio": best["grouped"] / best["per_row"]}  # fmt: skip
