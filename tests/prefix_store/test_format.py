"""Tests for prefix_store.format: upload parsing, PEFT conversion, raw byte encoding."""

import io
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from prefix_store.entry import PrefixSpec
from prefix_store.errors import InvalidPrefix, ModelMismatch
from prefix_store.fingerprint import prefix_spec_for
from prefix_store.format import (
    dtype_from_name,
    dtype_name,
    max_abs_value,
    parse_upload,
    tensor_from_bytes,
    tensor_to_bytes,
)

# Tiny GPT-2: 2 layers, 4 heads, head_dim 8, 128 positions.
SPEC = PrefixSpec(num_layers=2, num_kv_heads=4, head_dim=8, dtype=torch.float32, max_prefix_len=127)


def _gpt2() -> PreTrainedModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    )


def _llama() -> PreTrainedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def _st(**tensors: torch.Tensor) -> bytes:
    return safetensors.torch.save(tensors)


def _canonical(
    prefix_len: int = 5, spec: PrefixSpec = SPEC, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return torch.randn(spec.shape(prefix_len), dtype=dtype)


def _peft_config(**overrides: object) -> bytes:
    config: dict[str, object] = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 3,
        "num_layers": 2,
        "num_attention_heads": 4,
        "token_dim": 32,
        "num_transformer_submodules": 1,
    }
    config.update(overrides)
    return json.dumps(config).encode()


def _peft_weights(rows: int = 3, width: int = 2 * 2 * 4 * 8, key: str = "prompt_embeddings") -> bytes:
    return _st(**{key: torch.randn(rows, width)})


# --- canonical uploads -------------------------------------------------------------------


def test_canonical_round_trip() -> None:
    prefix = _canonical(5)
    out = parse_upload(SPEC, _st(prefix=prefix), None)
    assert torch.equal(out, prefix)
    assert out.is_contiguous() and out.device.type == "cpu" and out.dtype == torch.float32


def test_canonical_is_cast_to_spec_dtype() -> None:
    spec = PrefixSpec(2, 4, 8, torch.bfloat16, 127)
    prefix = _canonical(4, dtype=torch.float16)
    out = parse_upload(spec, _st(prefix=prefix), None)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, prefix.to(torch.bfloat16))


def test_canonical_prefix_len_limits() -> None:
    assert parse_upload(SPEC, _st(prefix=_canonical(127)), None).shape[3] == 127
    with pytest.raises(InvalidPrefix, match="prefix_len 128"):
        parse_upload(SPEC, _st(prefix=_canonical(128)), None)
    with pytest.raises(InvalidPrefix, match="prefix_len 0"):
        parse_upload(SPEC, _st(prefix=_canonical(0)), None)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"definitely not safetensors",
        pickle.dumps({"prefix": [1.0, 2.0]}),
        safetensors.torch.save({"prefix": torch.zeros(SPEC.shape(3))})[:-7],  # truncated
    ],
    ids=["empty", "garbage", "pickle", "truncated"],
)
def test_not_safetensors(payload: bytes) -> None:
    with pytest.raises(InvalidPrefix, match="weights is not a safetensors file"):
        parse_upload(SPEC, payload, None)


def test_torch_save_file_is_rejected_without_unpickling() -> None:
    buffer = io.BytesIO()
    torch.save({"prefix": _canonical(3)}, buffer)
    with pytest.raises(InvalidPrefix, match="weights is not a safetensors file"):
        parse_upload(SPEC, buffer.getvalue(), None)


def test_wrong_key_name() -> None:
    with pytest.raises(InvalidPrefix, match="exactly one tensor named 'prefix'.*'kv'"):
        parse_upload(SPEC, _st(kv=_canonical(3)), None)
    with pytest.raises(InvalidPrefix, match="exactly one tensor named 'prefix'"):
        parse_upload(SPEC, _st(prefix=_canonical(3), extra=torch.zeros(1)), None)


@pytest.mark.parametrize("shape", [(2, 2, 4, 5), (2, 3, 4, 5, 8), (1, 2, 2, 4, 5, 8)])
def test_not_a_prefix_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidPrefix, match="is not a prefix"):
        parse_upload(SPEC, _st(prefix=torch.zeros(shape)), None)


@pytest.mark.parametrize("shape", [(3, 2, 4, 5, 8), (2, 2, 2, 5, 8), (2, 2, 4, 5, 16)])
def test_wrong_model_dims(shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelMismatch) as info:
        parse_upload(SPEC, _st(prefix=torch.zeros(shape)), None)
    assert str(info.value) == (
        f"prefix shape {list(shape)} does not fit this model: "
        "expected [num_layers=2, 2, num_kv_heads=4, prefix_len, head_dim=8]"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(bad: float) -> None:
    prefix = _canonical(3)
    prefix[1, 0, 2, 1, 3] = bad
    with pytest.raises(InvalidPrefix, match="NaN or Inf"):
        parse_upload(SPEC, _st(prefix=prefix), None)


def test_overflow_on_cast_is_rejected() -> None:
    spec = PrefixSpec(2, 4, 8, torch.float16, 127)
    prefix = _canonical(3)
    prefix[0, 0, 0, 0, 0] = 1e6  # finite in float32, inf in float16
    with pytest.raises(InvalidPrefix, match="NaN or Inf values after conversion to float16"):
        parse_upload(spec, _st(prefix=prefix), None)


@pytest.mark.parametrize(
    ("dtype", "bound"), [(torch.float32, 6.52e18), (torch.bfloat16, 6.51e18), (torch.float16, 90.49)]
)
def test_values_beyond_the_attention_bound_are_refused(dtype: torch.dtype, bound: float) -> None:
    """|x| <= sqrt(dtype max / head_dim): just below it is accepted, just above refused (finite
    values all: 3e38 is finite in float32 and bfloat16, yet its attention scores are not)."""
    spec = PrefixSpec(2, 4, 8, dtype, 127)
    assert max_abs_value(dtype, spec.head_dim) == pytest.approx(bound, rel=1e-3)
    below, above = _canonical(3), _canonical(3)
    below[1, 0, 2, 1, 3] = -0.99 * bound
    above[1, 1, 2, 1, 3] = 1.01 * bound
    assert float(parse_upload(spec, _st(prefix=below), None).abs().max()) <= bound
    with pytest.raises(InvalidPrefix, match=r"at most .* head_dim 8 \(beyond it attention scores overflow"):
        parse_upload(spec, _st(prefix=above), None)
    if dtype != torch.float16:
        with pytest.raises(InvalidPrefix, match="at most"):
            parse_upload(spec, _st(prefix=torch.full(spec.shape(3), 3e38)), None)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_non_float_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(InvalidPrefix, match="dtype"):
        parse_upload(SPEC, _st(prefix=torch.zeros(SPEC.shape(3), dtype=dtype)), None)


def test_float64_accepted() -> None:
    prefix = _canonical(3, dtype=torch.float64)
    assert torch.equal(parse_upload(SPEC, _st(prefix=prefix), None), prefix.float())


# --- PEFT checkpoints --------------------------------------------------------------------


def _peft_layers(peft_model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's own per-layer (key, value), each [1, heads, P, head_dim]."""
    prompt = peft_model.get_prompt(batch_size=1)
    if hasattr(prompt, "layers"):  # a transformers Cache
        return [(layer.keys, layer.values) for layer in prompt.layers]
    return [(k, v) for k, v in prompt]


@pytest.mark.parametrize(
    ("make_model", "extra"),
    [
        (_gpt2, {}),
        (_llama, {}),
        (_llama, {"prefix_projection": True, "encoder_hidden_size": 16}),
        (_gpt2, {"prefix_projection": True, "encoder_hidden_size": 16}),
    ],
    ids=["gpt2", "llama-gqa", "llama-gqa-projection", "gpt2-projection"],
)
def test_peft_checkpoint_matches_peft(make_model, extra: dict[str, object], tmp_path: Path) -> None:
    base = make_model()
    num_virtual_tokens = 5
    peft_model = get_peft_model(
        base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, **extra)
    )
    torch.manual_seed(1)
    with torch.no_grad():  # move away from PEFT's init so the comparison means something
        for param in peft_model.prompt_encoder.parameters():
            param.add_(torch.randn_like(param))
    peft_model.save_pretrained(tmp_path)
    weights = (tmp_path / "adapter_model.safetensors").read_bytes()
    config = (tmp_path / "adapter_config.json").read_bytes()
    spec = prefix_spec_for(base.config, torch.float32, 128)

    prefix = parse_upload(spec, weights, config)

    assert prefix.shape == spec.shape(num_virtual_tokens) and prefix.is_contiguous()
    with torch.no_grad():
        layers = _peft_layers(peft_model)
    assert len(layers) == spec.num_layers
    for layer, (key, value) in enumerate(layers):
        assert torch.equal(prefix[layer, 0], key[0])
        assert torch.equal(prefix[layer, 1], value[0])


def test_peft_key_with_module_path() -> None:
    out = parse_upload(SPEC, _peft_weights(key="base_model.prompt_embeddings"), _peft_config())
    assert out.shape == SPEC.shape(3)


def test_peft_missing_embeddings() -> None:
    with pytest.raises(InvalidPrefix, match="prompt_embeddings"):
        parse_upload(SPEC, _st(prefix=_canonical(3)), _peft_config())


def test_peft_num_virtual_tokens_disagrees() -> None:
    with pytest.raises(InvalidPrefix, match="config says num_virtual_tokens=4 but the tensor has 3 rows"):
        parse_upload(SPEC, _peft_weights(rows=3), _peft_config(num_virtual_tokens=4))


@pytest.mark.parametrize(
    "config", [b"{not json", b"\xff\xfe\x00garbage", b""], ids=["broken", "binary", "empty"]
)
def test_peft_config_not_json(config: bytes) -> None:
    with pytest.raises(InvalidPrefix, match="config is not valid JSON"):
        parse_upload(SPEC, _peft_weights(), config)


def test_peft_config_not_an_object() -> None:
    with pytest.raises(InvalidPrefix, match="JSON object"):
        parse_upload(SPEC, _peft_weights(), b"[1, 2]")


@pytest.mark.parametrize("peft_type", ["LORA", None])
def test_peft_type_not_prefix_tuning(peft_type: str | None) -> None:
    with pytest.raises(InvalidPrefix, match="supported here: PREFIX_TUNING"):
        parse_upload(SPEC, _peft_weights(), _peft_config(peft_type=peft_type))


def test_peft_bad_field_type() -> None:
    with pytest.raises(InvalidPrefix, match="num_virtual_tokens must be an integer"):
        parse_upload(SPEC, _peft_weights(), _peft_config(num_virtual_tokens="3"))


@pytest.mark.parametrize(
    ("field", "value"), [("num_layers", 3), ("num_attention_heads", 2), ("token_dim", 64)]
)
def test_peft_config_for_another_model(field: str, value: int) -> None:
    with pytest.raises(ModelMismatch, match=f"config says {field}={value}"):
        parse_upload(SPEC, _peft_weights(), _peft_config(**{field: value}))


def test_peft_width_for_another_model() -> None:
    with pytest.raises(ModelMismatch, match="width 96 does not fit this model.*= 128"):
        parse_upload(SPEC, _peft_weights(width=96), _peft_config(num_layers=None, token_dim=None))


def test_peft_wrong_rank() -> None:
    with pytest.raises(InvalidPrefix, match="expected 2 dims"):
        parse_upload(SPEC, _st(prompt_embeddings=torch.zeros(3, 2, 64)), _peft_config())


def test_peft_non_finite_and_int() -> None:
    emb = torch.randn(3, 128)
    emb[2, 7] = float("nan")
    with pytest.raises(InvalidPrefix, match="NaN or Inf"):
        parse_upload(SPEC, _st(prompt_embeddings=emb), _peft_config())
    with pytest.raises(InvalidPrefix, match="dtype int64"):
        parse_upload(SPEC, _st(prompt_embeddings=torch.zeros(3, 128, dtype=torch.int64)), _peft_config())


def test_peft_encoder_decoder_rejected() -> None:
    with pytest.raises(InvalidPrefix, match="num_transformer_submodules"):
        parse_upload(SPEC, _peft_weights(), _peft_config(num_transformer_submodules=2))


def test_peft_pickle_weights_rejected() -> None:
    with pytest.raises(InvalidPrefix, match="weights is not a safetensors file"):
        parse_upload(SPEC, pickle.dumps({"prompt_embeddings": [0.0]}), _peft_config())


# --- raw bytes and dtype names -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_bytes_round_trip(dtype: torch.dtype) -> None:
    tensor = torch.randn(2, 2, 3, 4, 5).to(dtype)
    data = tensor_to_bytes(tensor)
    assert len(data) == tensor.numel() * tensor.element_size()
    back = tensor_from_bytes(data, dtype_name(dtype), tuple(tensor.shape))
    assert back.dtype == dtype and torch.equal(back, tensor)


def test_bytes_are_little_endian_row_major() -> None:
    tensor = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16).t()  # non-contiguous view
    assert tensor_to_bytes(tensor) == bytes([0x80, 0x3F, 0x00, 0x40])


def test_bytes_size_mismatch() -> None:
    data = tensor_to_bytes(torch.zeros(4))
    with pytest.raises(InvalidPrefix, match="16 bytes but float32 \\[5\\] needs 20"):
        tensor_from_bytes(data, "float32", (5,))


def test_bytes_empty_tensor() -> None:
    assert tensor_from_bytes(b"", "float16", (2, 0)).shape == (2, 0)


def test_dtype_names() -> None:
    for name in ["float32", "float16", "bfloat16", "float64"]:
        assert dtype_name(dtype_from_name(name)) == name
    assert dtype_from_name("torch.bfloat16") == torch.bfloat16
    with pytest.raises(InvalidPrefix, match="unknown dtype 'int8'"):
        dtype_from_name("int8")


def test_declared_fingerprint_of_another_model_is_model_mismatch() -> None:
    spec = PrefixSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, max_prefix_len=64)
    tensor = torch.randn(2, 2, 2, 3, 4)
    other = safetensors.torch.save({"prefix": tensor}, metadata={"model_fingerprint": "gpt2-other"})
    with pytest.raises(ModelMismatch, match="gpt2-other"):
        parse_upload(spec, other, None, fingerprint="gpt2-this")
    same = safetensors.torch.save({"prefix": tensor}, metadata={"model_fingerprint": "gpt2-this"})
    assert torch.equal(parse_upload(spec, same, None, fingerprint="gpt2-this"), tensor)
