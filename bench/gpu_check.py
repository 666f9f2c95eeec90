"""`make gpu-check`: everything a lent GPU should tell us, in one command of at most 8 minutes.

1. The PEFT oracle on the device, fp32 (token for token) and bf16 (teacher-forced agreement):
   tests/engine/test_oracle_device.py with PREFIX_TEST_DEVICE set.
2. The throughput bench on the device in bf16 with a Llama-1B shape (16 layers, 2048 wide, 32
   heads, 8 KV heads, 8192 MLP, 32k vocab), 32 tasks, 512 requests, 256 concurrent: mode B
   (PEFT's best case: one task, batched), mode D (our engine, every task mixed), the GEMM-rate
   roofline on that GPU, and the decode step at 256 rows over its GEMMs alone.
3. Writes `bench/results/gpu.json` and the `gpu` section of `docs/benchmarks.md`.

`--smoke` runs the same steps on the CPU with a tiny Llama in about a minute (the suite does,
so this cannot rot while no GPU is lent). Its bf16 work is sized to take seconds even on a CPU
that only emulates bf16 (the roofline GEMM is 256^3 there, not 2048^3).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import throughput  # noqa: E402
import throughput_modes as modes  # noqa: E402
from doc_sections import write_section  # noqa: E402

from server.engine.precision import machine_info, needs_fallback  # noqa: E402

LLAMA_1B = throughput.Workload(
    layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=32000, num_tasks=32,
    prefix_len=10, num_requests=512, prompt_min=16, prompt_max=128, new_tokens=64, concurrency=256,
    dtype="bfloat16", arch="llama", device="cuda",
)  # fmt: skip
SMOKE = replace(throughput.SMOKE, arch="llama", kv_heads=2, dtype="bfloat16", device="cpu")
ORACLE_TEST = "tests/engine/test_oracle_device.py"


def run_oracle(device: str) -> dict[str, Any]:
    """The oracle tests on `device`: pass/fail and the bf16 agreement lines they print."""
    env = {**os.environ, "PREFIX_TEST_DEVICE": device}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", ORACLE_TEST, "-s", "-p", "no:cacheprovider", "-W", "ignore"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = done.stdout
    summary = re.findall(r"\d+ (?:passed|failed)[^\n=]*", done.stdout)
    return {
        "passed": done.returncode == 0,
        "seconds": round(time.perf_counter() - started, 1),
        "bf16_agreement": re.findall(r"bf16 \S+ on \S+: agreement [\d.]+ over \d+ steps; \d+ clear", out),
        "summary": summary[-1] if summary else (done.stdout + done.stderr)[-800:],
    }


def run_throughput(w: throughput.Workload) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        modes.build(w, workdir)
        build_s = time.perf_counter() - started
        roof = modes.roofline(w)
        raw: dict[str, Any] = {}
        for group in throughput.mode_groups(["B", "D", "D256"], smoke=w.device == "cpu"):
            raw |= throughput.run_mode_process(group, w, workdir)
        rows = {m: throughput.summarise(m, result) for m, result in raw.items()}
    tps = {m: r["tokens_per_s"] for m, r in rows.items()}
    extra = rows["D"]["extra"]
    return {
        "workload": asdict(w),
        "build_s": round(build_s, 1),
        "roofline": roof,
        "ratios": {
            "D_over_B": tps["D"] / tps["B"],
            "D_over_roofline": tps["D"] / roof["roofline_tokens_per_s"],
            "D256_over_roofline": tps["D256"] / roof["roofline_tokens_per_s"],
            "decode_step_over_gemm": extra["decode_step_over_gemm"]["ratio"],
            "long_prompt_tpot_p99_over_p50": extra["long_prompt"]["ratio"],
        },
        "modes": {m: {k: v for k, v in r.items() if k not in ("ttft_s", "extra")} for m, r in rows.items()},
        "decode_step": extra["decode_step_over_gemm"],
    }


def markdown(result: dict[str, Any]) -> str:
    t = result["throughput"]
    w, r = t["workload"], t["ratios"]
    lines = [
        f"## GPU check ({result['device']})",
        "",
        f"One `make gpu-check` run, {result['date']}. Oracle fp32 + bf16 on the device: "
        f"{'passed' if result['oracle']['passed'] else 'FAILED'} ({result['oracle']['summary']}).",
        *[f"- {line}" for line in result["oracle"]["bf16_agreement"]],
        "",
        f"Throughput, bf16, {w['arch']} {w['layers']}x{w['hidden']} "
        f"({w['heads']} heads, {w['kv_heads']} KV), "
        f"{w['num_tasks']} tasks, {w['num_requests']} requests, {w['concurrency']} concurrent, "
        f"{w['new_tokens']} new tokens each:",
        "",
        "| mode | tokens/s | TTFT p50 ms | TPOT p50 ms | TPOT p99 ms |",
        "|---|---|---|---|---|",
    ]
    for mode, row in t["modes"].items():
        lines.append(
            f"| {mode} | {row['tokens_per_s']:.0f} | {row['ttft_p50_ms']:.0f} | {row['tpot_p50_ms']:.1f} "
            f"| {row['tpot_p99_ms']:.1f} |"
        )
    lines += [
        "",
        f"D/B {r['D_over_B']:.2f}; D / roofline {r['D_over_roofline']:.3f}, D256 / roofline "
        f"{r['D256_over_roofline']:.3f} (GEMM rate "
        f"{t['roofline']['gemm_2048_flops_per_s'] / 1e12:.0f} TFLOP/s); decode step / its GEMMs "
        f"{r['decode_step_over_gemm']:.2f} ({t['decode_step']['decode_step_ms']:.1f} ms vs "
        f"{t['decode_step']['decode_gemms_ms']:.1f} ms); long-prompt TPOT p99/p50 "
        f"{r['long_prompt_tpot_p99_over_p50']:.2f}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny Llama: checks the harness")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu-check: no CUDA device here (use --smoke to check the harness on the CPU)")
    device = "cpu" if args.smoke else "cuda"
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    result: dict[str, Any] = {"device": name, "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
    result["machine"] = machine_info()
    slow = needs_fallback(torch.bfloat16, device)
    if slow is not None:  # the smoke only checks the harness: tiny shapes, bf16 all the same
        print(f"gpu-check --smoke: {slow.reason()}; tiny shapes, so bf16 anyway", flush=True)
    result["oracle"] = run_oracle(device)
    print(json.dumps(result["oracle"], indent=2), flush=True)
    result["throughput"] = run_throughput(SMOKE if args.smoke else LLAMA_1B)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / ("gpu-smoke.json" if args.smoke else "gpu.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.smoke:
        write_section(ROOT / "docs" / "benchmarks.md", "gpu", markdown(result))
    print(markdown(result))
    sys.exit(0 if result["oracle"]["passed"] else 1)


if __name__ == "__main__":
    main()
