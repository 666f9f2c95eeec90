"""`bench/throughput.py --smoke`: every mode runs on a tiny model, so the harness cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_smoke(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "throughput-smoke.json").read_text())
    assert set(result["modes"]) == {"A", "B", "C", "D", "E"}
    for mode, row in result["modes"].items():
        assert row["tokens"] > 0 and row["tokens_per_s"] > 0, mode
        assert row["ttft_p50_ms"] is not None and row["peak_rss_mib"] > 0, mode
    assert result["roofline"]["roofline_tokens_per_s"] > 0
    assert 0 < result["ratios"]["decode_mfu_64_rows"] < 1
    assert (tmp_path / "throughput-smoke.png").stat().st_size > 10_000
