"""Pretrain the demo model from scratch on the generated corpus (minutes to an hour on one core).

The result is a byte-level model of the Llama shape (4 layers, 4 heads of 32, rotary positions,
0.85M parameters, ByT5 byte ids; `--family gpt2`: the former GPT-2 shape) saved in bfloat16
with its tokenizer through `save_pretrained`, i.e. loadable by the same `from_pretrained` path
as any hub model. bfloat16 weights are exactly representable in float32, so the server's
fingerprint is the same whichever of the two it loads them as.

    python -m trainer.pretrain_demo --out /tmp/demo --steps 6000   # then copy the weights

The budget is `--steps` (with `--seed`, the same run on the same CPU gives the same weights);
`--seconds` only caps it. Every `--eval-every` steps it prints how many values of held-out
copy records the model predicts (`copy_accuracy`) and its loss on repeated random codes
(`repeat_loss`: the plainest sign of a copying circuit). The committed weights came from two
runs chained with `--init`: copy documents only, then the mixed corpus (docs/training.md has
the commands, the copy curve and the runs that did not copy).

A plain loop, not `Trainer`: pretraining from scratch on an endless random-window stream
under a step budget is what this needs, and the loop is a dozen lines.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    ByT5Tokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    PreTrainedModel,
)

from trainer.copy_corpus import code_document, record
from trainer.demo_corpus import corpus

EOS_ID, PAD_ID, BYTE_OFFSET = 1, 0, 3  # ByT5: pad, eos, unk, then the 256 bytes


def demo_config(n_embd: int = 128, n_layer: int = 4) -> GPT2Config:
    """The demo model's shape: sized so that minutes on 2 cores give readable text; heads of 32."""
    return GPT2Config(
        vocab_size=384, n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_embd // 32,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        activation_function="relu",  # cheaper than tanh-GELU on a busy CPU, as good at this size
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # templated data: no overfitting to fear
    )  # fmt: skip


def llama_demo_config(n_embd: int = 128, n_layer: int = 4) -> LlamaConfig:
    """The same budget in a Llama shape: rotary positions, RMSNorm, a gated MLP of ~the same size."""
    return LlamaConfig(
        vocab_size=384, max_position_embeddings=1024, hidden_size=n_embd, num_hidden_layers=n_layer,
        num_attention_heads=n_embd // 32, num_key_value_heads=n_embd // 32, head_dim=32,
        intermediate_size=n_embd * 11 // 4, tie_word_embeddings=True,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )  # fmt: skip


def new_model(family: str, n_embd: int, n_layer: int) -> PreTrainedModel:
    if family == "llama":
        return AutoModelForCausalLM.from_config(llama_demo_config(n_embd, n_layer))
    return GPT2LMHeadModel(demo_config(n_embd, n_layer))


def encode_stream(docs: list[str]) -> np.ndarray:
    """ByT5 ids of every document, each followed by EOS, as one stream."""
    data = "\n".join(docs).encode()
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
    ids[ids == ord("\n") + BYTE_OFFSET] = EOS_ID
    return np.concatenate([ids, [EOS_ID]])


def batch(
    stream: np.ndarray, rng: np.random.Generator, size: int, length: int, max_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows; a quarter of them at random position offsets up to `max_offset` so that
    text after a prefix (which holds the first positions) stays in distribution."""
    starts = rng.integers(0, len(stream) - length, size)
    ids = torch.from_numpy(np.stack([stream[s : s + length] for s in starts]))
    offsets = np.where(rng.random(size) < 0.75, 0, rng.integers(0, max_offset + 1, size))
    positions = torch.from_numpy(offsets)[:, None] + torch.arange(length)[None, :]
    return ids, positions


def copy_probe(num: int, seed: int) -> list[tuple[str, str, list[str]]]:
    """Held-out copy records (a seed the corpus never uses): (source, sentence, values)."""
    rng = random.Random(seed)
    return [record(rng) for _ in range(num)]


@torch.no_grad()
def copy_accuracy(model: PreTrainedModel, probe: list[tuple[str, str, list[str]]]) -> tuple[float, float]:
    """(fraction of the values in held-out sentences whose every byte the model predicts, fraction
    of those values' bytes it predicts), argmax, teacher-forced: a value's first byte can only be
    right by finding the value in the record, its later bytes by copying what followed it there."""
    model.eval()
    hits = total = good_bytes = num_bytes = 0
    for source, sentence, values in probe:
        text = (source + sentence).encode()
        ids = torch.tensor([[b + BYTE_OFFSET for b in text]])
        predicted = model(input_ids=ids).logits[0].argmax(-1) - BYTE_OFFSET  # [len] byte at i+1
        for value in values:
            found = re.search(rf"(?<!\w){re.escape(value)}(?!\w)", sentence)
            assert found, (value, sentence)
            at = len(source.encode()) + len(sentence[: found.start()].encode())
            want = torch.tensor(list(value.encode()))
            right = predicted[at - 1 : at - 1 + len(want)] == want
            hits, total = hits + int(bool(right.all())), total + 1
            good_bytes, num_bytes = good_bytes + int(right.sum()), num_bytes + len(want)
    model.train()
    return hits / total, good_bytes / num_bytes


@torch.no_grad()
def repeat_loss(model: PreTrainedModel, num: int = 64, seed: int = 1000) -> float:
    """Mean loss (nats a byte) on the second half of held-out `Code: X. Repeat: X.` documents: only
    copying predicts it (chance: ln 57 = 4.04 for random codes); a copying circuit takes it near 0."""
    rng = random.Random(seed)
    codes = [c for c in (code_document(rng) for _ in range(4 * num)) if c.startswith("Code: ")][:num]
    model.eval()
    total = count = 0.0
    for text in codes:
        ids = torch.tensor([[b + BYTE_OFFSET for b in text.encode()]])
        start = len(text.split("Repeat: ")[0].encode()) + len("Repeat: ")  # first byte of the repeat
        logp = torch.log_softmax(model(input_ids=ids).logits[0, start - 1 : -1].float(), -1)
        total -= float(logp.gather(1, ids[0, start:, None]).sum())
        count += ids.shape[1] - start
    model.train()
    return total / count


def _copy_line(model: PreTrainedModel, probe: list[tuple[str, str, list[str]]]) -> str:
    values, value_bytes = copy_accuracy(model, probe)
    return f" copy {values:.3f} bytes {value_bytes:.3f} repeat-loss {repeat_loss(model):.2f}"


def _lr(args: argparse.Namespace, step: int, frac: float) -> float:
    """Warm-up, then cosine decay over the budget (steps, or wall-clock seconds)."""
    return args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    stream = encode_stream(corpus(args.docs, args.seed, args.copy_frac, args.open_names))
    probe = copy_probe(64, seed=1000)  # the same probe for every run, so that curves compare
    # --init continues an earlier run (the budget can be spent in several short runs)
    model = (
        AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        if args.init
        else new_model(args.family, args.n_embd, args.n_layer)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(stream):,} corpus bytes")
    start, step, tokens = time.monotonic(), 0, 0
    while step < args.steps and (elapsed := time.monotonic() - start) < args.seconds:
        frac = max(step / args.steps, elapsed / args.seconds)
        for group in opt.param_groups:
            group["lr"] = _lr(args, step, frac)
        ids, positions = batch(stream, rng, args.batch_size, args.length, args.max_offset)
        loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, tokens = step + 1, tokens + ids.numel()
        if step % 25 == 0:
            copy = _copy_line(model, probe) if step % args.eval_every == 0 else ""
            rate = f"{tokens / elapsed:,.0f} tok/s"
            print(f"step {step} {elapsed:.0f}s loss {loss.item():.3f}{copy} {rate}", flush=True)
    print(f"final{_copy_line(model, probe)} ({len(probe)} held-out records)")
    model.eval()
    model.bfloat16().save_pretrained(args.out)
    ByT5Tokenizer().save_pretrained(args.out)
    print(f"saved {args.out} after {step} steps, {time.monotonic() - start:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description="Pretrain the demo model on the generated corpus.")
    parser.add_argument("--out", type=Path, default=Path("server/engine/demo_weights"))
    parser.add_argument("--steps", type=int, default=6000, help="training budget in steps")
    parser.add_argument("--seconds", type=float, default=math.inf, help="wall-clock cap (stops early)")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between copy evals")
    parser.add_argument("--copy-frac", type=float, default=0.4, help="share of copy-teaching documents")
    parser.add_argument(
        "--open-names", type=float, default=0.0, help="share of made-up venues/towns in greetings/weather"
    )
    parser.add_argument("--family", choices=["llama", "gpt2"], default="llama", help="the model's shape")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", type=int, default=60_000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--max-offset", type=int, default=64, help="largest random position offset")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    parser.add_argument("--init", type=Path, default=None, help="continue from this saved model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
