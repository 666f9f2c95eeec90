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

Each mode runs in its own process (its own peak RSS). Reported: generated tokens/s, TTFT and
time per output token p50/p99, peak RSS, the workload roofline (2048^3 GEMM FLOP/s measured
in this run / model FLOPs per generated token), the decode-step MFU at 64 rows, the decode
step's time over its GEMMs' alone, and the TPOT p99/p50 of 63 decoding rows while a
1,000-token prompt is prefilled (bench/throughput_probes.py).
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


SMOKE = Workload(layers=2, hidden=64, heads=4, vocab=512, num_tasks=4, prefix_len=3, num_requests=8,
                 prompt_min=4, prompt_max=12, new_tokens=4, concurrency=4, peft_subset=2, gemm_size=256)  # fmt: skip
MODES = ("A", "B", "B2", "C", "D", "E")


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


def run_mode_process(mode: str, workload: Workload, workdir: Path) -> dict[str, Any]:
    out = workdir / f"mode-{mode}.json"
    command = [
        sys.executable,
        __file__,
        "--run-mode",
        mode,
        "--workdir",
        str(workdir),
        "--workload",
        json.dumps(asdict(workload)),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"mode {mode}: {time.perf_counter() - started:.0f} s", flush=True)
    return dict(json.loads(out.read_text()))


def child(mode: str, workload: Workload, workdir: Path) -> None:
    """Run one mode in this process and write its raw result."""
    runner = {"A": modes.peft_sequential, "B": modes.peft_batched, "B2": modes.peft_grouped,
              "C": modes.engine_one_task, "D": modes.engine_mixed, "E": throughput_http.http_mixed}[mode]  # fmt: skip
    result = runner(workload, workdir)
    if "peak_rss_kib" not in result:
        result["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (workdir / f"mode-{mode}.json").write_text(json.dumps(result))


def report(
    workload: Workload, rows: dict[str, dict[str, Any]], roof: dict[str, Any], smoke: bool
) -> dict[str, Any]:
    tps = {m: r["tokens_per_s"] for m, r in rows.items()}
    extra = rows["D"]["extra"]
    ratios = {
        "D_over_roofline": tps["D"] / roof["roofline_tokens_per_s"],
        "D_over_B": tps["D"] / tps["B"],
        "D_over_C": tps["D"] / tps["C"],
        "E_over_D": tps["E"] / tps["D"],
        "D_over_A": tps["D"] / tps["A"],
        "D_over_B2": tps["D"] / tps["B2"],
        "decode_mfu_64_rows": extra.get("decode_mfu"),
        "decode_step_over_gemm": extra["decode_step_over_gemm"]["ratio"],
        "long_prompt_tpot_p99_over_p50": extra["long_prompt"]["ratio"],
    }
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
        write_section(docs, name, throughput_report.markdown(result, f"bench/results/{name}.png"))


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
    parser.add_argument("--modes", default="".join(MODES), help="e.g. ABB2CDE or CD")
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
        rows = {
            m: summarise(m, run_mode_process(m, workload, workdir))
            for m in re.findall(r"B2|[A-E]", args.modes)
        }
    if set(rows) != set(MODES):
        print(
            json.dumps({m: {k: v for k, v in r.items() if k != "ttft_s"} for m, r in rows.items()}, indent=2)
        )
        return
    result = report(workload, rows, roof, args.smoke)
    write_outputs(result, args.out, docs)
    print(json.dumps({"ratios": result["ratios"], "roofline": roof}, indent=2))


if __name__ == "__main__":
    main()
