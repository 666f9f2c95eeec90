"""Throughput against PEFT, every mode in one run on one machine (`make bench`; never in CI).

Workload (full): GPT-2-small shape (12 layers, 768 wide, 12 heads, vocab 50257), random
weights from seed 0; 64 PEFT prefix-tuning tasks of 10 virtual tokens; 256 greedy requests,
prompts uniform in 16..128 tokens, 64 new tokens each (EOS ignored); 64 concurrent clients.

  A  PEFT per request: PeftModel + HF generate, one request at a time (a subset, rate scaled)
  B  PEFT's best case: one task's requests, batched 64 at a time with HF generate
  B2 PEFT on the mixed workload: requests grouped by task, each group batched (a subset)
  C  our engine, every request on one task
  D  our engine, the 64 tasks mixed
  E  D through the real HTTP server (`prefix-serve`), 64 concurrent streaming connections
  D256  D's prompts with 256 concurrent streams (bench/throughput_paged.py, as SP)
  SP  16 tasks of 256-position shared prefixes, 16 streams a task

Each mode runs in its own process (its own peak RSS). Reported: generated tokens/s, TTFT and
time per output token p50/p99, peak RSS, the workload roofline (2048^3 GEMM FLOP/s measured
in this run / model FLOPs per generated token), the decode-step MFU at 64 rows, the decode
step's time over its GEMMs' alone, and the TPOT p99/p50 of 63 decoding rows while a
1,000-token prompt is prefilled (bench/throughput_probes.py); the KV bytes per running row in SP,
the rows running at once in a slot layout's budget, and grouped over per-row prefix attention
(bench/throughput_paged.py).
`--smoke` runs everything on a tiny model in seconds (the test suite does, so it cannot rot).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import throughput_http  # noqa: E402
import throughput_modes as modes  # noqa: E402
import throughput_paged as paged  # noqa: E402
import throughput_report  # noqa: E402
from doc_sections import write_section  # noqa: E402

from server.engine.precision import machine_info, needs_fallback  # noqa: E402


@dataclass(frozen=True)
class Workload:
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    vocab: int = 50257
    num_tasks: int = 64
    prefix_len: int = 10
    num_requests: int = 256
    prompt_min: int = 16
    prompt_max: int = 128
    new_tokens: int = 64
    concurrency: int = 64
    peft_subset: int = 16  # requests measured for mode A (its rate does not depend on the count)
    dtype: str = "float32"
    arch: str = "gpt2"  # or "llama" (GQA + SwiGLU; `make gpu-check`'s Llama-1B shape)
    kv_heads: int = 0  # 0: as many as `heads`
    intermediate: int = 0  # 0: 4 x hidden
    device: str = "cpu"
    gemm_size: int = 2048  # the roofline's square GEMM (8192 on CUDA)
    probe_repeats: int = 7  # timings of the grouped-attention probe (each way; the median counts)


SMOKE = Workload(layers=2, hidden=64, heads=4, vocab=512, num_tasks=4, prefix_len=3, num_requests=8,
                 prompt_min=4, prompt_max=12, new_tokens=4, concurrency=4, peft_subset=2, gemm_size=256,
                 probe_repeats=1)  # fmt: skip
MODES = ("A", "B", "B2", "C", "D", "E", "D256", "SP")
MODE_PATTERN = r"D256|B2|SP|[A-E]"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(mode: str, result: dict[str, Any]) -> dict[str, Any]:
    ttft, tpot = result["ttft_s"], result["tpot_s"]
    return {
        "mode": mode,
        "tokens": result["tokens"],
        "seconds": result["seconds"],
        "tokens_per_s": result["tokens"] / result["seconds"],
        "ttft_p50_ms": _ms(percentile(ttft, 0.5)),
        "ttft_p99_ms": _ms(percentile(ttft, 0.99)),
        "tpot_p50_ms": _ms(percentile(tpot, 0.5)),
        "tpot_p99_ms": _ms(percentile(tpot, 0.99)),
        "peak_rss_mib": result["peak_rss_kib"] / 1024,
        "note": result.get("note", ""),
        "ttft_s": ttft,
        "extra": {
            k: v
            for k, v in result.items()
            if k not in ("ttft_s", "tpot_s", "tokens", "seconds", "peak_rss_kib", "note")
        },
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def run_mode_process(group: list[str], workload: Workload, workdir: Path) -> dict[str, dict[str, Any]]:
    """Run the modes of `group` one after the other in a child process; their raw results."""
    command = [sys.executable, __file__, "--run-mode", ",".join(group), "--workdir", str(workdir),
               "--workload", json.dumps(asdict(workload))]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"mode {'+'.join(group)}: {time.perf_counter() - started:.0f} s", flush=True)
    return {m: dict(json.loads((workdir / f"mode-{m}.json").read_text())) for m in group}


def mode_groups(names: list[str], smoke: bool) -> list[list[str]]:
    """A process a mode (each mode's memory and warm-up its own); the smoke runs every mode in one
    process, where a process start (torch, transformers) costs more than the tiny modes do."""
    return [names] if smoke else [[m] for m in names]


def child(group: str, workload: Workload, workdir: Path) -> None:
    """Run the modes of `group` ("D", or "A,B,...": the smoke) in this process; write their raw results."""
    runners = {"A": modes.peft_sequential, "B": modes.peft_batched, "B2": modes.peft_grouped,
               "C": modes.engine_one_task, "D": modes.engine_mixed, "E": throughput_http.http_mixed,
               "D256": paged.engine_mixed_256, "SP": paged.engine_shared_prefix}  # fmt: skip
    for mode in group.split(","):
        modes.reset_peak_rss()
        started = time.perf_counter()
        result = runners[mode](workload, workdir)
        print(f"  {mode}: {time.perf_counter() - started:.1f} s", flush=True)
        if "peak_rss_kib" not in result:
            result["peak_rss_kib"] = modes.vm_hwm_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (workdir / f"mode-{mode}.json").write_text(json.dumps(result))


def _ratios(workload: Workload, rows: dict[str, dict[str, Any]], roof: dict[str, Any]) -> dict[str, Any]:
    """Every ratio of the report; None where a mode it needs did not run (`--modes`)."""
    tps = {m: r["tokens_per_s"] for m, r in rows.items()}
    extra = {m: r["extra"] for m, r in rows.items()}
    flops_256 = modes.workload_flops_per_generated_token(paged.d256_workload(workload))
    formulas = {
        "D_over_roofline": lambda: tps["D"] / roof["roofline_tokens_per_s"],
        "D_over_B": lambda: tps["D"] / tps["B"],
        "D_over_C": lambda: tps["D"] / tps["C"],
        "E_over_D": lambda: tps["E"] / tps["D"],
        "D_over_A": lambda: tps["D"] / tps["A"],
        "D_over_B2": lambda: tps["D"] / tps["B2"],
        "decode_mfu_64_rows": lambda: extra["D"].get("decode_mfu"),
        "decode_step_over_gemm": lambda: extra["D"]["decode_step_over_gemm"]["ratio"],
        "long_prompt_tpot_p99_over_p50": lambda: extra["D"]["long_prompt"]["ratio"],
        "long_prompt_max_step_over_decode_step": lambda: extra["D"]["long_prompt"][
            "max_step_over_decode_step"
        ],
        "D256_over_roofline": lambda: tps["D256"] / (roof["gemm_2048_flops_per_s"] / flops_256),
        "SP_over_D": lambda: tps["SP"] / tps["D"],
        "sp_kv_bytes_per_row_over_own": lambda: extra["SP"]["kv_per_row_over_own"],
        "capacity_over_slot_layout": lambda: extra["D256"]["capacity"]["ratio"],
        "grouped_attention_over_per_row": lambda: extra["SP"]["grouped_attention"]["ratio"],
    }
    ratios = {}
    for name, formula in formulas.items():
        try:
            ratios[name] = formula()
        except KeyError:
            ratios[name] = None
    return ratios


def report(
    workload: Workload, rows: dict[str, dict[str, Any]], roof: dict[str, Any], smoke: bool
) -> dict[str, Any]:
    rows = {m: rows[m] for m in MODES if m in rows}  # the table's order, whatever order they ran in
    ratios = _ratios(workload, rows, roof)
    return {
        "machine": machine_info(),
        "smoke": smoke,
        "workload": asdict(workload),
        "roofline": roof,
        "ratios": ratios,
        "modes": {m: {k: v for k, v in r.items() if k != "ttft_s"} for m, r in rows.items()},
        "ttft_s": {m: r["ttft_s"] for m, r in rows.items()},
    }


def _result_name(workload: Workload, smoke: bool) -> str:
    name = "throughput-smoke" if smoke else "throughput"
    return name + ("" if workload.dtype == "float32" else "-bf16")  # fp32 and bf16 side by side


def write_outputs(result: dict[str, Any], out_dir: Path, docs: Path | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = _result_name(Workload(**result["workload"]), result["smoke"])
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    throughput_report.plot(result, out_dir / f"{name}.png")
    if docs is not None:
        write_section(docs, name, throughput_report.markdown(result, f"../bench/results/{name}.png"))


def write_skipped(workload: Workload, reason: str, out_dir: Path, docs: Path | None, smoke: bool) -> None:
    """A dtype this CPU only emulates: one line and a JSON that says so, never slow numbers that
    would read as the engine's."""
    name = _result_name(workload, smoke)
    result = {"skipped": reason, "machine": machine_info(), "smoke": smoke, "workload": asdict(workload)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if docs is not None:
        write_section(docs, name, throughput_report.skipped_markdown(result))
    print(f"throughput --dtype {workload.dtype}: skipped: {reason}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, seconds: checks the harness")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--modes", default="".join(MODES), help="e.g. ABB2CDE, CD or D256SP")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--run-mode", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_mode:
        child(args.run_mode, Workload(**json.loads(args.workload)), args.workdir)
        return
    base = SMOKE if args.smoke else Workload()
    workload = Workload(**{**asdict(base), "dtype": args.dtype})
    docs = None if args.smoke else ROOT / "docs" / "benchmarks.md"
    slow = needs_fallback(modes.DTYPES[args.dtype], workload.device)
    if slow is not None and not args.smoke:
        write_skipped(workload, slow.reason(), args.out, docs, args.smoke)
        return
    if slow is not None:  # the smoke only checks the harness: tiny shapes take seconds all the same
        print(f"throughput --smoke --dtype {args.dtype}: {slow.reason()}; tiny shapes, so run anyway")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        modes.build(workload, workdir)
        roof = modes.roofline(workload)
        raw: dict[str, dict[str, Any]] = {}
        for group in mode_groups(re.findall(MODE_PATTERN, args.modes), args.smoke):
            raw.update(run_mode_process(group, workload, workdir))
        rows = {m: summarise(m, r) for m, r in raw.items()}
    result = report(workload, rows, roof, args.smoke)
    if set(rows) != set(MODES):  # a partial run: its JSON only, never the docs
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{_result_name(workload, args.smoke)}-partial.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({"ratios": result["ratios"], "modes": result["modes"]}, indent=2))
        return
    write_outputs(result, args.out, docs)
    print(json.dumps({"ratios": result["ratios"], "roofline": roof}, indent=2))


if __name__ == "__main__":
    main()
