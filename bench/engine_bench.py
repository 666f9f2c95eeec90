"""Engine throughput against PEFT, measured in the same run (not a test; `make bench`).

Workload: a GPT-2-small-shaped model (12 layers, 768 wide, random weights, byte vocab),
`--tasks` PEFT prefix-tuning adapters of different lengths, `--requests` greedy requests
spread over them, each generating `--new-tokens` tokens (EOS ignored).

- baseline: PEFT `PeftModel.generate` per request, one after the other (its KV cache on),
  switching adapters with `set_adapter`: what stitching PEFT into a web handler gives.
- ours, sequential: the engine, one request at a time (per-request overhead).
- ours, concurrent: the engine with every request submitted at once (mixed-task batches).

The first `--oracle-checks` requests are also checked against DESIGN.md's oracle (PEFT
full-forward greedy), for the engine and for `PeftModel.generate` alike.

Every figure is reported as a ratio to the baseline measured in this run.

`--penalty-costs` measures instead what sampling penalties cost: the concurrent engine run with
no row penalised and with every row penalised, and the batched sampler alone on a realistic
vocabulary (`--vocab`) with 0, 1 and all rows penalised.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, ByT5Tokenizer, GPT2Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefix_store.entry import PrefixEntry, PrefixMeta  # noqa: E402
from prefix_store.fingerprint import prefix_spec_for  # noqa: E402
from prefix_store.format import parse_upload  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.kv_cache import KVLayout, SlotKVCache  # noqa: E402
from server.engine.model_loader import ModelOptions, load_model  # noqa: E402
from server.engine.penalties import PenaltyTable  # noqa: E402
from server.engine.precision import machine_info  # noqa: E402
from server.engine.request import SamplingParams  # noqa: E402
from server.engine.sampler import sample  # noqa: E402

PENALISED = SamplingParams(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.2)


def build(root: Path, num_tasks: int) -> tuple[Path, list[Path]]:
    tokenizer = ByT5Tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=1,
    )  # wide greedy margins, so the cross-check against PEFT is not decided by float noise
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapters = []
    for i in range(num_tasks):
        base = AutoModelForCausalLM.from_pretrained(root / "model")
        peft = get_peft_model(
            base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=(10, 20, 50)[i % 3])
        )
        with torch.no_grad():
            for param in peft.prompt_encoder.parameters():
                param.normal_(0.0, 0.5)
        peft.save_pretrained(root / f"adapter{i}")
        adapters.append(root / f"adapter{i}")
    return root / "model", adapters


def workload(num_requests: int, num_tasks: int) -> list[tuple[int, list[int]]]:
    generator = torch.Generator().manual_seed(1)
    cases = []
    for i in range(num_requests):
        length = 16 + (i * 13) % 49
        cases.append((i % num_tasks, [int(t) for t in torch.randint(3, 259, (length,), generator=generator)]))
    return cases


def run_peft(model_dir: Path, adapters: list[Path], cases: list[tuple[int, list[int]]], new_tokens: int):  # type: ignore[no-untyped-def]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), adapters[0], adapter_name="a0"
    )
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    outputs = []
    started = time.perf_counter()
    with torch.inference_mode():
        for task, prompt in cases:
            model.set_adapter(f"a{task}")
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return time.perf_counter() - started, outputs


def oracle(model_dir: Path, adapters: list[Path], cases, new_tokens: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """DESIGN.md's reference: greedy by repeated full forward passes of PEFT's model (no cache)."""
    outputs = []
    with torch.inference_mode():
        for task, prompt in cases:
            model = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(model_dir), adapters[task]
            ).eval()
            ids = list(prompt)
            for _ in range(new_tokens):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            outputs.append(ids[len(prompt) :])
    return outputs


def run_engine(model_dir: Path, adapters: list[Path], cases, new_tokens: int, concurrent: bool, batch: int,  # type: ignore[no-untyped-def]
               base: SamplingParams | None = None):  # fmt: skip
    loaded = load_model(ModelOptions(str(model_dir), "cpu", "float32", Path(tempfile.mkdtemp())))
    spec = prefix_spec_for(loaded.model.config, loaded.dtype, loaded.max_positions)
    prefixes = []
    for i, path in enumerate(adapters):
        weights = (path / "adapter_model.safetensors").read_bytes()
        kv = parse_upload(spec, weights, (path / "adapter_config.json").read_bytes())
        prefixes.append(PrefixEntry(PrefixMeta(f"t{i}", 1, kv.shape[3], 0, "float32", "", ""), kv))
    layout = KVLayout(
        spec.num_layers, spec.num_kv_heads, spec.head_dim, batch, 256, loaded.dtype, loaded.device
    )
    params = dataclasses.replace(base or SamplingParams(), max_new_tokens=new_tokens, ignore_eos=True)

    async def main():  # type: ignore[no-untyped-def]
        engine = Engine(loaded, SlotKVCache(layout), EngineConfig(max_queue=10_000))
        engine.start(asyncio.get_running_loop())

        async def one(task: int, prompt: list[int]) -> list[int]:
            return [t async for o in engine.submit(prefixes[task], prompt, params) for t in o.token_ids]

        try:
            await one(*cases[0])  # warm-up
            started = time.perf_counter()
            if concurrent:
                outputs = await asyncio.gather(*(one(t, p) for t, p in cases))
            else:
                outputs = [await one(t, p) for t, p in cases]
            return time.perf_counter() - started, list(outputs)
        finally:
            engine.stop()

    return asyncio.run(main())


def sampler_step_ms(vocab: int, rows: int, num_penalised: int, steps: int) -> float:
    """Time of one greedy `sample` over `[rows, vocab]` logits with `num_penalised` rows penalised
    (each with a 200-token prompt), history updates included: the best of 5 means of `steps`
    steps (the least disturbed by other processes on a shared machine)."""
    logits = torch.randn(rows, vocab)
    params = [PENALISED if i < num_penalised else SamplingParams() for i in range(rows)]
    table = PenaltyTable(rows, vocab, torch.device("cpu"))
    for slot in range(num_penalised):
        table.load(slot, torch.randint(0, vocab, (200,)).tolist(), [])
    slots = list(range(rows))
    sample(logits, params, [None] * rows, table.for_step(params, slots))  # warm-up
    means = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(steps):
            sample(logits, params, [None] * rows, table.for_step(params, slots))
        means.append((time.perf_counter() - started) / steps * 1e3)
    return min(means)


def penalty_costs(args: argparse.Namespace) -> dict[str, object]:
    """The engine with no row and every row penalised; the sampler alone at `--vocab`."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = build(Path(tmp), args.tasks)
        cases = workload(args.requests, args.tasks)
        total = args.requests * args.new_tokens
        engine = {}
        for name, base in (("none", SamplingParams()), ("all", PENALISED)):
            seconds, _ = run_engine(model_dir, adapters, cases, args.new_tokens, True, args.batch, base)
            engine[f"penalised_{name}"] = {"seconds": seconds, "tokens_per_s": total / seconds}
    rows, threads = min(args.batch, args.requests), torch.get_num_threads()
    # one thread: on a shared machine an OpenMP barrier waiting for a descheduled thread costs
    # milliseconds, which would swamp these sub-millisecond operations
    torch.set_num_threads(args.sampler_threads)
    sampler = {f"penalised_rows_{n}": sampler_step_ms(args.vocab, rows, n, steps=5) for n in (0, 1, rows)}
    torch.set_num_threads(threads)
    return {
        "engine_concurrent_byte_vocab": engine,
        "sampler_ms_per_step": {"vocab": args.vocab, "rows": rows, "threads": args.sampler_threads} | sampler,
        # per slot: float32 counts + bool seen mask; scratch for the penalised rows: 3 float32 + 1 bool
        "penalty_table_bytes": rows * args.vocab * 5,
        "penalty_scratch_bytes_all_penalised": rows * args.vocab * 13,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--oracle-checks", type=int, default=8, help="requests checked against the PEFT oracle"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine_bench.json")
    parser.add_argument("--penalty-costs", action="store_true", help="measure sampling penalties only")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary of the sampler-only timing")
    parser.add_argument(
        "--sampler-threads", type=int, default=1, help="torch threads of the sampler-only timing"
    )
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.penalty_costs:
        workload = vars(args) | {"out": str(args.out)}
        report = {"machine": machine_info(), "workload": workload} | penalty_costs(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = build(Path(tmp), args.tasks)
        cases = workload(args.requests, args.tasks)
        total = args.requests * args.new_tokens
        peft_s, peft_out = run_peft(model_dir, adapters, cases, args.new_tokens)
        seq_s, seq_out = run_engine(model_dir, adapters, cases, args.new_tokens, False, args.batch)
        conc_s, conc_out = run_engine(model_dir, adapters, cases, args.new_tokens, True, args.batch)
        checked = cases[: args.oracle_checks]
        reference = oracle(model_dir, adapters, checked, args.new_tokens)
    result = {
        "machine": machine_info(),
        "workload": vars(args) | {"out": str(args.out), "generated_tokens": total},
        "peft_generate_sequential": {"seconds": peft_s, "tokens_per_s": total / peft_s},
        "engine_sequential": {
            "seconds": seq_s,
            "tokens_per_s": total / seq_s,
            "speedup_vs_peft": peft_s / seq_s,
        },
        "engine_concurrent": {
            "seconds": conc_s,
            "tokens_per_s": total / conc_s,
            "speedup_vs_peft": peft_s / conc_s,
        },
        "outputs_equal_sequential_vs_concurrent": seq_out == conc_out,
        "oracle_checked_requests": len(checked),
        "engine_equal_to_oracle": sum(a == b for a, b in zip(conc_out, reference, strict=False)),
        "peft_generate_equal_to_oracle": sum(a == b for a, b in zip(peft_out, reference, strict=False)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
