"""The report of `bench/throughput.py`: the plot and the markdown section of docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server.engine.precision import describe


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["modes"]
    fig, (bars, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(rows)
    bars.bar(names, [rows[m]["tokens_per_s"] for m in names], color="#4c72b0")
    bars.axhline(
        result["roofline"]["roofline_tokens_per_s"],
        color="#c44e52",
        linestyle="--",
        label="workload roofline",
    )
    bars.set_ylabel("generated tokens / s")
    bars.set_title("Throughput by mode")
    bars.legend()
    for mode, ttfts in result["ttft_s"].items():
        ordered = sorted(ttfts)
        cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=mode)
    cdf.set_xlabel("time to first token (s)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("TTFT CDF")
    cdf.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def skipped_markdown(result: dict[str, Any]) -> str:
    """The bf16 section when this CPU only emulates bf16: why there are no numbers."""
    return "\n".join([
        "## Throughput in bfloat16 (the same workload, the same `make bench`)",
        "",
        f"Skipped on this machine ({describe(result['machine'])}): {result['skipped']}. "
        "Run `make bench` on a CPU with native bf16 (AVX-512 BF16 or AMX) for these numbers.",
    ])  # fmt: skip


def _cell(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any], png: str) -> str:
    rows = result["modes"]
    is_fp32 = result["workload"]["dtype"] == "float32"
    name = "throughput" if is_fp32 else "throughput-bf16"
    lines = [
        "# Benchmarks" if is_fp32 else "## Throughput in bfloat16 (the same workload, the same `make bench`)",
        "",
        f"Produced by `make bench` (`.venv/bin/python bench/throughput.py{'' if is_fp32 else ' --dtype bfloat16'}`); "
        f"JSON in `bench/results/{name}.json`.",
        f"Machine: {describe(result['machine'])}. Workload: `{json.dumps(result['workload'])}`.",
        "",
        "| mode | what | tokens/s | x A | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    what = {"A": "PEFT generate, one request at a time", "B": "PEFT generate, one task, batches of 64",
            "B2": "PEFT generate, 64 tasks mixed: grouped by task, each group batched",
            "C": "engine, one task", "D": "engine, 64 tasks mixed", "E": "D over HTTP (64 streaming clients)",
            "D256": "D's requests, 256 streams (all at once)",
            "SP": "engine, 16 tasks of 256-position prefixes, 16 streams a task"}  # fmt: skip
    for mode, row in rows.items():
        lines.append(
            f"| {mode} | {what[mode]} | {_cell(row['tokens_per_s'])} | {_cell(row['tokens_per_s'] / rows['A']['tokens_per_s'], 2)} | "
            f"{_cell(row['ttft_p50_ms'], 0)} / {_cell(row['ttft_p99_ms'], 0)} | {_cell(row['tpot_p50_ms'])} / {_cell(row['tpot_p99_ms'])} | "
            f"{_cell(row['peak_rss_mib'], 0)} |"
        )
    roof = result["roofline"]
    lines += [
        "",
        f"Workload roofline: GEMM 2048^3 = {roof['gemm_2048_flops_per_s'] / 1e9:.1f} GFLOP/s measured in this run, "
        f"{roof['flops_per_generated_token'] / 1e9:.3f} GFLOP per generated token (its share of prefill included) "
        f"-> {roof['roofline_tokens_per_s']:.0f} tokens/s.",
        "",
        *_ratio_table(result["ratios"]),
        "",
        f"Notes: A: {rows['A']['note']}. B: {rows['B']['note']}."
        + (f" B2: {rows['B2']['note']}." if "B2" in rows else ""),
        *_paged_notes(rows),
        "",
        f"![throughput and TTFT]({png})",
        "",
    ]
    return "\n".join(lines)


def _ratio_table(ratios: dict[str, Any]) -> list[str]:
    return [
        "| ratio | value | target |",
        "| --- | --- | --- |",
        f"| D / roofline | {ratios['D_over_roofline']:.2f} | >= 0.65 |",
        f"| D / B | {ratios['D_over_B']:.2f} | >= 2.0 |",
        f"| D / B2 | {_cell(ratios.get('D_over_B2'), 2)} | reported |",
        f"| D / C | {ratios['D_over_C']:.2f} | >= 0.95 |",
        f"| E / D | {ratios['E_over_D']:.2f} | >= 0.90 |",
        f"| decode step / its GEMMs alone, 64 rows | {_cell(ratios.get('decode_step_over_gemm'), 2)} | <= 1.25 |",
        f"| long-prompt TPOT p99 / p50 (63 decoding, 1,000-token prompt) | "
        f"{_cell(ratios.get('long_prompt_tpot_p99_over_p50'), 2)} | <= 1.5 |",
        f"| longest step of that prefill / median decode-only step | "
        f"{_cell(ratios.get('long_prompt_max_step_over_decode_step'), 2)} | reported (~1.5 by design) |",
        f"| D256 / its roofline | {_cell(ratios.get('D256_over_roofline'), 2)} | >= 0.65 |",
        f"| SP / D (tokens/s) | {_cell(ratios.get('SP_over_D'), 2)} | reported |",
        f"| SP: KV bytes held per running row / bytes of its own tokens | "
        f"{_cell(ratios.get('sp_kv_bytes_per_row_over_own'), 2)} | <= 1.15 |",
        f"| rows running at once in the slot layout's budget for 16 rows of 2,048 / 16 | "
        f"{_cell(ratios.get('capacity_over_slot_layout'), 2)} | >= 4 |",
        f"| grouped / per-row prefix attention, 64 rows, 512-position prefix | "
        f"{_cell(ratios.get('grouped_attention_over_per_row'), 2)} | <= 0.5 |",
        f"| decode-step MFU, 64 rows | {_cell(ratios['decode_mfu_64_rows'], 2)} | reported |",
        f"| D / A | {ratios['D_over_A']:.2f} | reported |",
    ]


def _paged_notes(rows: dict[str, Any]) -> list[str]:
    """What the probes of bench/throughput_paged.py and the long-prompt probe saw, in figures."""
    if not {"D", "D256", "SP"} <= set(rows):
        return []
    long, cap = rows["D"]["extra"]["long_prompt"], rows["D256"]["extra"]["capacity"]
    sp, attn = rows["SP"]["extra"], rows["SP"]["extra"]["grouped_attention"]
    return [
        "",
        f"Long prompt: {long['prefill_steps']} steps of prefill at the default flags (chunks capped by the "
        f"scheduler's stall rule while rows decode), TPOT p50 {long['tpot_p50_ms']:.0f} ms, p99 "
        f"{long['tpot_p99_ms']:.0f} ms. Capacity: {cap['peak_rows']} rows at once in "
        f"{cap['kv_budget_bytes'] / 2**20:.0f} MiB ({cap['offered']} D requests offered, {cap['steps']} steps). "
        f"SP: {sp['peak_rows']} rows at the peak; KV held per row over own tokens "
        f"{sp['kv_per_row_over_own']:.2f} there, {sp['kv_per_row_over_own_mean']:.2f} averaged over every "
        f"step (ramp and drain included). Attention probe ({attn['rows']} rows, {attn['prefix_len']}-position "
        f"prefix, {attn['own']} own tokens, one layer, median): grouped {attn['grouped_ms']:.1f} ms, per row "
        f"{attn['per_row_ms']:.1f} ms, outputs equal to {attn['max_abs_diff']:.1e}.",
    ]
