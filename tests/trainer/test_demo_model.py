"""The committed demo model: installed into the data dir, replaced when stale, and it writes
words of its corpus (not byte soup)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engine.demo_model import DEMO_WEIGHTS, ensure_demo_model
from trainer.demo_corpus import corpus
from trainer.prefix import greedy


def test_installs_and_replaces_a_stale_model(tmp_path: Path) -> None:
    target = ensure_demo_model(tmp_path / "demo")
    shipped = (DEMO_WEIGHTS / "model.safetensors").read_bytes()
    assert (target / "model.safetensors").read_bytes() == shipped
    assert len(shipped) <= 10 * 2**20
    (target / "model.safetensors").write_bytes(b"an older demo model")
    ensure_demo_model(target)
    assert (target / "model.safetensors").read_bytes() == shipped
    assert not (tmp_path / "demo.tmp").exists()


def test_greedy_text_is_made_of_corpus_words() -> None:
    vocabulary = {w for doc in corpus(3000, seed=0) for w in re.findall(r"[A-Za-z']+", doc)}
    tokenizer = AutoTokenizer.from_pretrained(DEMO_WEIGHTS)
    model = AutoModelForCausalLM.from_pretrained(DEMO_WEIGHTS, dtype=torch.float32)
    for prompt in ["Hello", "The Eagle is", "Today in York"]:
        ids = greedy(model, tokenizer.encode(prompt, add_special_tokens=False), 60, tokenizer.eos_token_id)
        text = prompt + str(tokenizer.decode(ids))
        words = re.findall(r"[A-Za-z']+", text)[:-1]  # the last one may be cut off
        known = [w for w in words if w in vocabulary]
        assert len(words) >= 3 and len(known) >= 0.8 * len(words), text
