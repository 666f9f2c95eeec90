"""Tests for prefix_store.fingerprint: model identity and the prefix shape a model needs."""

import copy
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from prefix_store.fingerprint import model_fingerprint, prefix_spec_for


def _gpt2_config() -> GPT2Config:
    return GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=128, bos_token_id=0, eos_token_id=0
    )


def _llama_config(**overrides: object) -> LlamaConfig:
    kwargs: dict[str, object] = {
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "vocab_size": 64,
        "max_position_embeddings": 128,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(_gpt2_config())


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config())


def test_readable_format() -> None:
    gpt2 = _gpt2(0)
    assert re.fullmatch(r"gpt2-L2-H4-D8-[0-9a-f]{16}", model_fingerprint(gpt2, gpt2.config))
    llama = _llama(0)
    assert re.fullmatch(r"llama-L2-H4-KV2-D8-[0-9a-f]{16}", model_fingerprint(llama, llama.config))


def test_same_weights_same_fingerprint() -> None:
    first, second = _gpt2(0), _gpt2(0)
    assert model_fingerprint(first, first.config) == model_fingerprint(second, second.config)
    clone = copy.deepcopy(first)
    assert model_fingerprint(first, first.config) == model_fingerprint(clone, clone.config)


@pytest.mark.parametrize("make_model", [_gpt2, _llama])
def test_different_seed_different_fingerprint(make_model) -> None:
    first, second = make_model(0), make_model(1)
    assert model_fingerprint(first, first.config) != model_fingerprint(second, second.config)


def test_change_in_last_parameter_is_seen() -> None:
    model = _llama(0)
    before = model_fingerprint(model, model.config)
    name, param = sorted(model.named_parameters())[-1]
    assert len(list(model.parameters())) > 16, "the sample must not simply cover every parameter"
    with torch.no_grad():
        param.view(-1)[0] += 1.0
    assert model_fingerprint(model, model.config) != before, name


def test_bfloat16_load_of_bfloat16_weights_matches() -> None:
    fp32 = _llama(0).to(torch.bfloat16).to(torch.float32)  # weights exactly representable in bf16
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert model_fingerprint(fp32, fp32.config) == model_fingerprint(bf16, bf16.config)


def test_prefix_spec_gpt2() -> None:
    spec = prefix_spec_for(_gpt2_config(), torch.bfloat16, 128)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 4, 8)
    assert spec.dtype == torch.bfloat16 and spec.max_prefix_len == 126


def test_prefix_spec_gqa_llama() -> None:
    spec = prefix_spec_for(_llama_config(), torch.float32, 128)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 8)
    assert spec.shape(5) == (2, 2, 2, 5, 8)


def test_prefix_spec_explicit_head_dim() -> None:
    spec = prefix_spec_for(_llama_config(head_dim=16), torch.float32, 64)
    assert spec.head_dim == 16 and spec.max_prefix_len == 62


def test_prefix_spec_needs_three_positions() -> None:
    with pytest.raises(ValueError, match="max_positions"):
        prefix_spec_for(_gpt2_config(), torch.float32, 2)
