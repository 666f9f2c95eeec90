"""The benchmarks run briefly on tiny models in the suite, so their harnesses cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_smoke(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "throughput-smoke.json").read_text())
    assert set(result["modes"]) == {"A", "B", "B2", "C", "D", "E", "D256", "SP"}
    for mode, row in result["modes"].items():
        assert row["tokens"] > 0 and row["tokens_per_s"] > 0, mode
        assert row["ttft_p50_ms"] is not None and row["peak_rss_mib"] > 0, mode
    assert result["roofline"]["roofline_tokens_per_s"] > 0
    assert result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert 0 < result["ratios"]["decode_mfu_64_rows"] < 1
    for key in ("D256_over_roofline", "SP_over_D", "sp_kv_bytes_per_row_over_own",
                "capacity_over_slot_layout", "grouped_attention_over_per_row",
                "long_prompt_tpot_p99_over_p50",
                "long_prompt_max_step_over_decode_step"):  # fmt: skip
        assert math.isfinite(result["ratios"][key]) and result["ratios"][key] > 0, key
    assert result["ratios"]["sp_kv_bytes_per_row_over_own"] >= 1  # rows hold at least their own tokens
    assert result["ratios"]["capacity_over_slot_layout"] > 1  # short rows: more than the slot layout's 16
    assert result["modes"]["SP"]["extra"]["grouped_attention"]["max_abs_diff"] < 1e-4  # the two ways agree
    assert (tmp_path / "throughput-smoke.png").stat().st_size > 10_000
    sys.path.insert(0, str(ROOT / "bench"))
    import throughput_report  # the docs section of a full run, from the smoke's result

    text = throughput_report.markdown(result, "throughput-smoke.png")
    assert "| D256 |" in text and "| SP |" in text and "Capacity: " in text


def test_soak_smoke(tmp_path: Path) -> None:
    """A 6-second soak (16 clients, every kind of traffic, tenant keys): nothing lost or
    mis-answered, no 5xx, nothing left running. RSS growth is not judged on so short a run."""
    out = tmp_path / "soak.json"
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "6", "--clients", "16"]
    command += ["--no-docs", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    totals = result["totals"]
    assert totals["ok"] > 50 and totals["lost"] == 0 and totals["wrong"] == 0 and totals["status_5xx"] == 0
    assert result["healthy_after"] and not result["problems"]
    assert all(value == 0 for value in result["gauges_after"].values())
    assert set(result["kinds"]) >= {
        "generate",
        "generate_stream",
        "completions",
        "bad_request",
        "cancel_stream",
    }


def test_gpu_check_smoke(tmp_path: Path) -> None:
    """`make gpu-check`'s steps on the CPU with a tiny Llama in bf16: the device oracle passes,
    and B, D, D256 (the paged path at 256 streams), the roofline and the probes report."""
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert result["oracle"]["passed"] and len(result["oracle"]["bf16_agreement"]) == 2
    assert result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    throughput = result["throughput"]
    assert set(throughput["modes"]) == {"B", "D", "D256"} and throughput["workload"]["arch"] == "llama"
    assert throughput["ratios"]["D256_over_roofline"] > 0
    assert all(row["tokens_per_s"] > 0 for row in throughput["modes"].values())
    assert throughput["ratios"]["D_over_B"] > 0 and throughput["roofline"]["roofline_tokens_per_s"] > 0
