"""Acceptance (issue 26): a model with Qwen2.5-0.5B's KV geometry (24 layers, 2 KV heads of 64,
32,768 positions; tiny hidden size) at default flags runs 64 concurrent requests of ~300
positions all at once in the default KV budget (the slot layout held 1 row), read from the
engine's stats."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig

from prefix_store.entry import PrefixEntry, PrefixMeta
from server.config import Settings
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.kv_cache import PagedKVCache
from server.engine.model_loader import ModelOptions, load_model
from server.engine.request import SamplingParams
from server.kv_plan import plan_kv
from tests.tiny_models import VOCAB

# 300 positions a row; all 64 prompts fit one step of the default token budget (512)
NUM_TASKS, ROWS_PER_TASK, PREFIX_LEN, PROMPT_LEN, NEW_TOKENS = 4, 16, 290, 6, 4


def _qwen_geometry(path: Path) -> Path:
    config = LlamaConfig(
        hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=64, num_hidden_layers=24,
        intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=32768, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


def test_64_rows_of_300_positions_run_at_once_at_default_flags(tmp_path: Path) -> None:
    loaded = load_model(ModelOptions(str(_qwen_geometry(tmp_path / "model")), "cpu", "float32", tmp_path))
    settings = Settings()
    layout = plan_kv(settings, loaded)
    assert (layout.max_len, settings.kv_cache_bytes) == (32768, 1 << 30)
    assert settings.kv_cache_bytes // layout.bytes_per_slot == 1  # what the slot layout held
    prefixes = [
        PrefixEntry(
            PrefixMeta(f"t{i}", 1, PREFIX_LEN, 0, "float32", "fp", "now"),
            torch.randn(24, 2, 2, PREFIX_LEN, 64, generator=torch.Generator().manual_seed(i)),
        )
        for i in range(NUM_TASKS)
    ]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    peak = {"running": 0, "prefix_blocks": 0, "refs": 0}

    async def run() -> list[int]:
        engine = Engine(loaded, PagedKVCache(layout), EngineConfig(max_queue=settings.max_queue))
        engine.start(asyncio.get_running_loop())

        async def one(i: int) -> int:
            handle = engine.submit(
                prefixes[i % NUM_TASKS], [3 + (i + j) % 250 for j in range(PROMPT_LEN)], params
            )
            tokens = 0
            async for output in handle:
                tokens += len(output.token_ids)
                stats = engine.stats()
                if stats.num_running > peak["running"]:
                    peak.update(running=stats.num_running, prefix_blocks=stats.blocks.num_prefix_blocks)
                    peak["refs"] = stats.blocks.num_prefix_refs
            return tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(NUM_TASKS * ROWS_PER_TASK)))
        finally:
            engine.stop()

    counts = asyncio.run(run())
    assert counts == [NEW_TOKENS] * NUM_TASKS * ROWS_PER_TASK
    assert peak["running"] == NUM_TASKS * ROWS_PER_TASK
    assert peak["prefix_blocks"] == NUM_TASKS * -(-PREFIX_LEN // 16)  # one copy per task, shared by its rows
    assert peak["refs"] == NUM_TASKS * ROWS_PER_TASK
