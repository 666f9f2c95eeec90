"""Does `torch.compile` (inductor, CPU) speed up the engine's decode forward? One trial, written
to bench/results/compile_trial.json; the engine keeps eager unless this shows a measurable win.

GPT-2-small shape (12 x 768, vocab 50257), 64 decode rows at a mid-generation context, the
engine's own `ModelRunner.forward` (slot attention, StepCache) with the HF model compiled
(`dynamic=True`: the token count changes every step). Eager and compiled steps alternate in the
same process so the machine's noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import throughput  # noqa: E402
import throughput_modes as modes  # noqa: E402
import throughput_probes as probes  # noqa: E402

from server.engine.precision import machine_info, needs_fallback  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compile_trial.json")
    args = parser.parse_args()
    base = throughput.SMOKE if args.smoke else throughput.Workload()
    w = replace(base, dtype=args.dtype, num_tasks=1)
    slow = needs_fallback(modes.DTYPES[args.dtype], w.device)
    if slow is not None and not args.smoke:
        print(f"compile_trial --dtype {args.dtype}: skipped: {slow.reason()}")
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        modes.build(w, Path(tmp))
        engine, _ = modes._engine(w, Path(tmp))
    step, _ = probes._decode_step(engine, w)
    eager_model = engine.core.runner.model
    result: dict[str, Any] = {"workload": "smoke" if args.smoke else "gpt2-small", "dtype": args.dtype}
    result["machine"] = machine_info()
    started = time.perf_counter()
    # one graph for every layer (layer_idx is an int attribute: static by default, so each of the
    # 12 layers would compile its own graph and pass the recompile limit)
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch._dynamo.config.recompile_limit = 64
    try:
        engine.core.runner.model = torch.compile(eager_model, dynamic=True)
        step()  # compiles
        step()
        result["compile_s"] = round(time.perf_counter() - started, 1)
    except Exception as exc:  # a failed compile is a result too
        result["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        engine.core.runner.model = eager_model
    eager: list[float] = []
    compiled: list[float] = []
    if "error" not in result:
        compiled_model = engine.core.runner.model
        for _ in range(args.repeats):
            engine.core.runner.model = eager_model
            eager.append(probes.timed(step))
            engine.core.runner.model = compiled_model
            compiled.append(probes.timed(step))
        result["eager_step_ms"] = round(1000 * min(eager), 1)
        result["compiled_step_ms"] = round(1000 * min(compiled), 1)
        result["compiled_over_eager"] = round(min(compiled) / min(eager), 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
