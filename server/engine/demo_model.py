"""The embedded default model: small, GPT-2-shaped, byte-level, needs no download."""

from pathlib import Path

import torch
from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

DEMO_SEED = 0


def ensure_demo_model(path: Path) -> Path:
    """Create the demo model under `path` once (deterministic weights); later runs just load it."""
    if (path / "config.json").exists():
        return path
    tokenizer = ByT5Tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(DEMO_SEED)
    model = GPT2LMHeadModel(config)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)  # a half-written model dir is never mistaken for a finished one
    return path
