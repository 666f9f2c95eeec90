"""The modes of `bench/throughput.py`, the workload builder, the roofline and the report."""

from __future__ import annotations

import asyncio
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

import throughput_probes as probes  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- workload -----------------------------------------------------------------------------
def model_config(w: Any) -> Any:
    """GPT-2 (`arch="gpt2"`) or Llama (GQA, SwiGLU) of the workload's shape."""
    if w.arch == "llama":
        return LlamaConfig(
            num_hidden_layers=w.layers, hidden_size=w.hidden, num_attention_heads=w.heads,
            num_key_value_heads=w.kv_heads or w.heads, intermediate_size=w.intermediate or 4 * w.hidden,
            vocab_size=w.vocab, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    return GPT2Config(
        n_layer=w.layers, n_embd=w.hidden, n_head=w.heads, vocab_size=w.vocab, n_positions=1024,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def build(w: Any, workdir: Path) -> None:
    """The model (fixed seed, saved in the workload's dtype), a tokenizer covering its vocab, and
    one PEFT adapter per task."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(w))
    model.to(DTYPES[w.dtype]).save_pretrained(workdir / "model")
    vocab = {f"t{i}": i for i in range(w.vocab)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="t0", pad_token="t0").save_pretrained(
        workdir / "model"
    )
    peft = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=w.prefix_len))
    for task in range(w.num_tasks):
        torch.manual_seed(1000 + task)
        with torch.no_grad():
            for param in peft.prompt_encoder.parameters():
                param.normal_(0.0, 0.5)
        peft.save_pretrained(workdir / "adapters" / str(task))


def requests(w: Any, one_task: bool = False) -> list[tuple[int, list[int]]]:
    """(task, prompt ids) for every request: prompt lengths uniform in [prompt_min, prompt_max]."""
    rng = random.Random(7)
    out = []
    for i in range(w.num_requests):
        length = rng.randint(w.prompt_min, w.prompt_max)
        out.append((0 if one_task else i % w.num_tasks, [rng.randrange(1, w.vocab) for _ in range(length)]))
    return out


# ---- peak RSS -----------------------------------------------------------------------------
def vm_hwm_kib(pid: int | str = "self") -> int:
    """A process's peak resident memory (Linux); 0 where unknown."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Start this process's peak RSS anew (Linux; elsewhere nothing): several modes in one process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ---- roofline -----------------------------------------------------------------------------
def gemm_flops_per_s(dtype: torch.dtype, device: str = "cpu", n: int = 2048) -> float:
    n = max(n, 8192) if device == "cuda" else n  # a GPU needs a bigger GEMM to reach its rate
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    torch.mm(a, b)
    best = min(probes.timed(lambda: torch.mm(a, b)) for _ in range(5))
    return 2 * n**3 / best


def model_flops(w: Any) -> dict[str, float]:
    """Matmul FLOPs: per token through the body, the LM head, and attention per context position."""
    h, kv = w.hidden, w.hidden * (w.kv_heads or w.heads) // w.heads
    inter, num_mlp = w.intermediate or 4 * h, 3 if w.arch == "llama" else 2  # SwiGLU has 3 matrices
    macs = 2 * h * h + 2 * h * kv + num_mlp * h * inter  # q, o; k, v; the MLP
    body = 2 * w.layers * macs  # x2 FLOPs per MAC
    return {"body": body, "head": 2 * h * w.vocab, "attention_per_position": 4 * w.layers * h}


def workload_flops_per_generated_token(w: Any) -> float:
    f = model_flops(w)
    total = 0.0
    for _, prompt in requests(w):
        p = len(prompt)
        total += p * f["body"] + f["head"]  # prefill (logits of the last position only)
        total += f["attention_per_position"] * sum(w.prefix_len + i + 1 for i in range(p))
        for t in range(1, w.new_tokens):  # the first token comes from prefill
            total += f["body"] + f["head"] + f["attention_per_position"] * (w.prefix_len + p + t)
    return total / (w.num_requests * w.new_tokens)


def roofline(w: Any) -> dict[str, float]:
    gemm = gemm_flops_per_s(DTYPES[w.dtype], w.device, w.gemm_size)
    per_token = workload_flops_per_generated_token(w)
    return {
        "gemm_2048_flops_per_s": gemm,
        "flops_per_generated_token": per_token,
        "roofline_tokens_per_s": gemm / per_token,
    }


# ---- A and B: PEFT ----------------------------------------------------------------------------
class _FirstToken:
    """A generate() streamer that notes when the first new token of the batch appears."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _peft(w: Any, workdir: Path, tasks: list[int]) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=DTYPES[w.dtype]).to(w.device)
    model = PeftModel.from_pretrained(base, workdir / "adapters" / str(tasks[0]), adapter_name=str(tasks[0]))
    for task in tasks[1:]:
        model.load_adapter(workdir / "adapters" / str(task), adapter_name=str(task))
    return model.eval()


def _generate(model: PeftModel, ids: torch.Tensor, mask: torch.Tensor, w: Any) -> tuple[float, float, float]:
    streamer = _FirstToken()
    started = time.perf_counter()
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens,
                       do_sample=False, pad_token_id=0, streamer=streamer)  # fmt: skip
    ended = time.perf_counter()
    first = streamer.times[1] if len(streamer.times) > 1 else ended  # times[0]: the prompt
    return started, first, ended


def peft_sequential(w: Any, workdir: Path) -> dict[str, Any]:
    subset = requests(w)[: w.peft_subset]
    model = _peft(w, workdir, sorted({t for t, _ in subset}))
    ttft, tpot, seconds = [], [], 0.0
    for task, prompt in subset:
        model.set_adapter(str(task))
        ids = torch.tensor([prompt])
        started, first, ended = _generate(model, ids, torch.ones_like(ids), w)
        ttft.append(first - started)
        tpot.append((ended - first) / max(w.new_tokens - 1, 1))
        seconds += ended - started
    note = f"measured on {len(subset)} of {w.num_requests} requests, one at a time; rate = tokens / time of those"
    return {
        "tokens": len(subset) * w.new_tokens,
        "seconds": seconds,
        "ttft_s": ttft,
        "tpot_s": tpot,
        "note": note,
    }


def peft_batched(w: Any, workdir: Path) -> dict[str, Any]:
    model = _peft(w, workdir, [0])
    reqs = requests(w, one_task=True)
    ttft, tpot = [], []
    started_all = time.perf_counter()
    for start in range(0, len(reqs), w.concurrency):
        batch = [p for _, p in reqs[start : start + w.concurrency]]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        began = time.perf_counter()
        started, first, ended = _generate(model, ids, mask, w)
        ttft += [first - started_all] * len(batch)  # all arrive at t=0 (closed loop of 64)
        tpot += [(ended - first) / max(w.new_tokens - 1, 1)] * len(batch)
        del began
    seconds = time.perf_counter() - started_all
    return {"tokens": len(reqs) * w.new_tokens, "seconds": seconds, "ttft_s": ttft, "tpot_s": tpot,
            "note": "one task, batches of `concurrency` with left padding (PEFT cannot mix prefix tasks)"}  # fmt: skip


def peft_grouped(w: Any, workdir: Path) -> dict[str, Any]:
    """B2: the mixed workload as a PEFT server would run it: requests grouped by task (PEFT
    cannot mix prefix tasks in one batch), each group one batched generate. Measured on the
    groups of a quarter of the tasks (the rate does not depend on how many)."""
    groups: dict[int, list[list[int]]] = {}
    for task, prompt in requests(w):
        groups.setdefault(task, []).append(prompt)
    tasks = sorted(groups)[: max(1, w.num_tasks // 4)]
    model = _peft(w, workdir, tasks)
    ttft, tpot, tokens = [], [], 0
    started_all = time.perf_counter()
    for task in tasks:
        model.set_adapter(str(task))
        for start in range(0, len(groups[task]), w.concurrency):
            batch = groups[task][start : start + w.concurrency]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            _, first, ended = _generate(model, ids, mask, w)
            ttft += [first - started_all] * len(batch)  # all arrive at t=0
            tpot += [(ended - first) / max(w.new_tokens - 1, 1)] * len(batch)
            tokens += len(batch) * w.new_tokens
    note = f"the groups of {len(tasks)} of {w.num_tasks} tasks, one batched generate per task"
    return {"tokens": tokens, "seconds": time.perf_counter() - started_all, "ttft_s": ttft, "tpot_s": tpot,
            "note": note}  # fmt: skip


# ---- C and D: the engine in-process -----------------------------------------------------------
def load(w: Any, workdir: Path) -> tuple[Any, Any]:
    """The served model (`LoadedModel`) and its prefix spec."""
    from prefix_store.fingerprint import prefix_spec_for
    from server.engine.model_loader import ModelOptions, load_model

    loaded = load_model(ModelOptions(str(workdir / "model"), w.device, w.dtype, workdir / "data"))
    return loaded, prefix_spec_for(loaded.model.config, loaded.dtype, loaded.max_positions)


def peft_prefixes(w: Any, workdir: Path, spec: Any) -> list[Any]:
    """Each task's PEFT adapter as the engine's prefix entry."""
    from prefix_store.entry import PrefixEntry, PrefixMeta
    from prefix_store.format import parse_upload

    prefixes = []
    for task in range(w.num_tasks):
        path = workdir / "adapters" / str(task)
        weights, config = (
            (path / "adapter_model.safetensors").read_bytes(),
            (path / "adapter_config.json").read_bytes(),
        )
        kv = parse_upload(spec, weights, config)
        prefixes.append(PrefixEntry(PrefixMeta(f"t{task}", 1, w.prefix_len, 0, w.dtype, "", ""), kv))
    return prefixes


def kv_layout(w: Any, loaded: Any, spec: Any, num_blocks: int | None = None) -> Any:
    """`concurrency` rows of the workload's longest sequence (or `num_blocks` blocks)."""
    from server.engine.kv_cache import KVLayout

    max_len = w.prefix_len + w.prompt_max + w.new_tokens
    return KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, w.concurrency, max_len,
                    loaded.dtype, loaded.device, num_blocks)  # fmt: skip


def _engine(w: Any, workdir: Path, num_blocks: int | None = None) -> tuple[Any, list[Any]]:
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.kv_cache import PagedKVCache

    loaded, spec = load(w, workdir)
    engine = Engine(
        loaded, PagedKVCache(kv_layout(w, loaded, spec, num_blocks)), EngineConfig(max_queue=100_000)
    )
    return engine, peft_prefixes(w, workdir, spec)


async def _closed_loop(w: Any, reqs: list[tuple[int, list[int]]], one: Any) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request when the last one finished."""
    queue: asyncio.Queue[tuple[int, list[int]]] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    ttft: list[float] = []
    tpot: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while not queue.empty():
            task, prompt = queue.get_nowait()
            started = time.perf_counter()
            times = await one(task, prompt)
            ttft.append(times[0] - started)
            tpot.append((times[-1] - times[0]) / max(len(times) - 1, 1))
            tokens += len(times)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(w.concurrency)))
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "ttft_s": ttft, "tpot_s": tpot}


def serve(w: Any, engine: Any, prefixes: list[Any], reqs: list[tuple[int, list[int]]]) -> dict[str, Any]:
    """`reqs` through the engine by `concurrency` closed-loop clients (after one warm-up request)."""
    from server.engine.request import SamplingParams

    params = SamplingParams(max_new_tokens=w.new_tokens, ignore_eos=True)

    async def main() -> dict[str, Any]:
        engine.start(asyncio.get_running_loop())

        async def one(task: int, prompt: list[int]) -> list[float]:
            return [time.perf_counter() async for _ in engine.submit(prefixes[task], prompt, params)]

        try:
            await one(0, [1, 2, 3])  # warm-up
            return await _closed_loop(w, reqs, one)
        finally:
            engine.stop()

    result = asyncio.run(main())
    result["peak_rss_kib"] = vm_hwm_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result


def _run_engine(w: Any, workdir: Path, one_task: bool) -> dict[str, Any]:
    engine, prefixes = _engine(w, workdir)
    # the workload's peak RSS (in `serve`), before the probes below allocate their own KV (the
    # long-prompt probe's 64 rows x 1,074 positions are ~5 GiB in fp32 at this shape)
    result = serve(w, engine, prefixes, requests(w, one_task=one_task))
    if not one_task:
        gemm = gemm_flops_per_s(DTYPES[w.dtype], w.device, w.gemm_size)
        result["decode_mfu"] = probes.decode_mfu(engine, w, gemm, model_flops(w))
        result["decode_step_over_gemm"] = probes.decode_step_over_gemm(engine, w)
        result["long_prompt"] = probes.long_prompt_interference(engine.loaded, prefixes[0], w)
    return result


def engine_one_task(w: Any, workdir: Path) -> dict[str, Any]:
    return _run_engine(w, workdir, one_task=True)


def engine_mixed(w: Any, workdir: Path) -> dict[str, Any]:
    return _run_engine(w, workdir, one_task=False)
