"""The token budget against long-prompt interference (`--max-num-batched-tokens`), one run.

GPT-2-small shape (as `bench/throughput.py`), 63 rows decoding, one 1,000-token prompt arrives:
for each budget, the 63 rows' TPOT p99 / p50 over the steps around its prefill, the steps that
prefill took, and the decode-only step time. A smaller budget keeps the running rows' steps
short (p99/p50 near 1) but spreads the prompt over more steps (its time to first token grows).
Writes bench/results/long_prompt_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import throughput  # noqa: E402
import throughput_modes as modes  # noqa: E402
import throughput_probes as probes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="128,256,512,1024")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long_prompt_sweep.json")
    args = parser.parse_args()
    w = throughput.SMOKE if args.smoke else throughput.Workload()
    long_len = 40 if args.smoke else 1000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        modes.build(w, Path(tmp))
        engine, prefixes = modes._engine(w, Path(tmp))
    for budget in (int(b) for b in args.budgets.split(",")):
        probe = probes.long_prompt_interference(engine.loaded, prefixes[0], w, long_len, budget)
        rows.append(probe)
        print(json.dumps(probe), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"long_prompt_tokens": long_len, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
