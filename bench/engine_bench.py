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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
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
from server.engine.engine import Engine  # noqa: E402
from server.engine.kv_cache import KVLayout, SlotKVCache  # noqa: E402
from server.engine.model_loader import ModelOptions, load_model  # noqa: E402
from server.engine.request import SamplingParams  # noqa: E402


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


def run_engine(model_dir: Path, adapters: list[Path], cases, new_tokens: int, concurrent: bool, batch: int):  # type: ignore[no-untyped-def]
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
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    async def main():  # type: ignore[no-untyped-def]
        engine = Engine(loaded, SlotKVCache(layout), max_queue=10_000)
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
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
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
        "machine": f"{platform.machine()} {torch.get_num_threads()} torch threads, torch {torch.__version__}",
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
