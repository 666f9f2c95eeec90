"""Tiny models, PEFT prefix-tuning adapters and the oracle (PEFT full-forward greedy).

Everything is built from a config and saved/loaded through the real `from_pretrained`
path; nothing is downloaded. `initializer_range=0.3` gives wide greedy margins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import (
    CartridgeConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM, ByT5Tokenizer, GPT2Config, LlamaConfig, PretrainedConfig

VOCAB = 384  # ByT5Tokenizer's size: 3 specials + 256 bytes + 125 extra ids
MAX_POSITIONS = 256


def tiny_config(kind: str, max_positions: int = MAX_POSITIONS) -> PretrainedConfig:
    if kind == "gpt2":
        return GPT2Config(
            n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=max_positions,
            initializer_range=0.3, bos_token_id=1, eos_token_id=1,
        )  # fmt: skip
    if kind == "gpt2-wide":  # deep and wide KV (64 KiB a position), small weights: for big prefixes
        return GPT2Config(
            n_layer=64, n_head=2, n_embd=128, vocab_size=VOCAB, n_positions=max_positions,
            initializer_range=0.3, bos_token_id=1, eos_token_id=1,
        )  # fmt: skip
    if kind == "llama":
        return LlamaConfig(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=max_positions,
            initializer_range=0.3, bos_token_id=1, eos_token_id=1,
        )  # fmt: skip
    raise ValueError(kind)


def save_tiny_model(kind: str, path: Path, seed: int = 0, max_positions: int = MAX_POSITIONS) -> Path:
    """A tiny causal LM of `kind` with a byte-level tokenizer, saved with save_pretrained."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, max_positions))
    model.save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


@dataclass(frozen=True)
class Adapter:
    """A PEFT prefix-tuning checkpoint on disk."""

    path: Path
    num_virtual_tokens: int

    @property
    def weights(self) -> bytes:
        return (self.path / "adapter_model.safetensors").read_bytes()

    @property
    def config(self) -> bytes:
        return (self.path / "adapter_config.json").read_bytes()


def save_adapter(
    model_dir: Path,
    out: Path,
    num_virtual_tokens: int,
    seed: int,
    projection: bool = False,
    peft_type: str = "PREFIX_TUNING",
) -> Adapter:
    """Create a PEFT prompt-learning adapter with random (trained-looking) weights; save_pretrained it.

    `peft_type`: PREFIX_TUNING (optionally with `projection`), CARTRIDGE, PROMPT_TUNING or P_TUNING.
    """
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config: PeftConfig
    if peft_type == "PREFIX_TUNING":
        config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=num_virtual_tokens,
            prefix_projection=projection,
            encoder_hidden_size=16,
        )
    elif peft_type == "CARTRIDGE":  # the first token frozen, as PEFT and the paper recommend
        config = CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    elif peft_type == "PROMPT_TUNING":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    else:
        config = PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=16
        )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.normal_(0.0, 0.5)
    model.save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["num_virtual_tokens"] == num_virtual_tokens
    return Adapter(out, num_virtual_tokens)


class Oracle:
    """Greedy reference by repeated full forward passes of PEFT's model (no KV cache);
    of the plain model when `adapter` is None."""

    def __init__(self, model_dir: Path, adapter: Adapter | None) -> None:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        self.model = (base if adapter is None else PeftModel.from_pretrained(base, adapter.path)).eval()

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        """Returns the generated ids and the smallest top-1/top-2 logit margin seen."""
        ids = list(prompt_ids)
        margin = float("inf")
        for _ in range(max_new_tokens):
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
            top2 = torch.topk(logits.float(), 2).values
            margin = min(margin, float(top2[0] - top2[1]))
            ids.append(int(logits.argmax()))
        return ids[len(prompt_ids) :], margin


def prompt_of_length(length: int, seed: int) -> list[int]:
    """Byte-token ids (3..258) of the given length."""
    generator = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(3, 259, (length,), generator=generator)]


def unambiguous_case(
    oracle: Oracle, length: int, seed: int, max_new_tokens: int, min_margin: float
) -> tuple[list[int], list[int]]:
    """A prompt of `length` whose reference continuation has a top-2 margin above `min_margin`
    at every step (so equality with it is not luck), with its expected ids."""
    for attempt in range(50):
        prompt = prompt_of_length(length, seed + attempt)
        expected, margin = oracle.greedy(prompt, max_new_tokens)
        if margin > min_margin:
            return prompt, expected
    raise AssertionError(f"no prompt of length {length} with a reference margin above {min_margin}")
