"""Prefix upload formats, validation and the raw byte encoding used for storage.

The canonical prefix is one tensor `[num_layers, 2, num_kv_heads, prefix_len, head_dim]`
(index 0 of dim 1 is the key, 1 the value). Uploads come either in that form (a safetensors
file with one tensor `prefix`) or as a PEFT prefix-tuning checkpoint (`prompt_embeddings`
`[P, num_layers * 2 * num_kv_heads * head_dim]` plus its `adapter_config.json`).
Uploads are parsed with `safetensors` only: nothing a client sends is ever unpickled.
"""

import json
import math
from typing import Any

import safetensors.torch
import torch

from prefix_store.entry import PrefixSpec
from prefix_store.errors import InvalidPrefix, ModelMismatch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_PEFT_KEY = "prompt_embeddings"


def parse_upload(
    spec: PrefixSpec, weights: bytes, config_json: bytes | None, fingerprint: str | None = None
) -> torch.Tensor:
    """Validate an upload and return the canonical prefix for `spec`'s model.

    `weights` is a safetensors file: the canonical tensor `prefix` when `config_json` is None,
    else a PEFT `adapter_model.safetensors` described by `config_json` (`adapter_config.json`).
    Returns a contiguous CPU tensor `[num_layers, 2, num_kv_heads, prefix_len, head_dim]` in
    `spec.dtype`. Raises InvalidPrefix for malformed uploads, ModelMismatch for well-formed
    prefixes whose shape belongs to another model, or whose safetensors metadata names
    another model's `model_fingerprint` than `fingerprint`.
    """
    tensors = load_safetensors(weights)
    declared = _metadata(weights).get("model_fingerprint")
    if fingerprint is not None and declared is not None and declared != fingerprint:
        raise ModelMismatch(
            f"prefix was made for model {declared!r}, but this server runs model {fingerprint!r}"
        )
    if config_json is None:
        prefix = _canonical_from_tensors(spec, tensors)
    else:
        prefix = _canonical_from_peft(spec, tensors, parse_peft_config(config_json))
    return finish_prefix(spec, prefix)


def load_safetensors(weights: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(bytes(weights))
    except Exception as exc:  # the parser raises several types; all mean "not safetensors"
        raise InvalidPrefix(f"weights is not a safetensors file: {exc}") from exc


def _metadata(weights: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors header (already known to parse)."""
    header_len = int.from_bytes(weights[:8], "little")
    metadata = json.loads(weights[8 : 8 + header_len]).get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def _expected(spec: PrefixSpec) -> str:
    return (
        f"expected [num_layers={spec.num_layers}, 2, num_kv_heads={spec.num_kv_heads}, "
        f"prefix_len, head_dim={spec.head_dim}]"
    )


def _canonical_from_tensors(spec: PrefixSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if list(tensors) != ["prefix"]:
        raise InvalidPrefix(
            f"weights must hold exactly one tensor named 'prefix' ({_expected(spec)}), "
            f"found tensors {sorted(tensors)} (send part 'config' too for a PEFT checkpoint)"
        )
    prefix = tensors["prefix"]  # [num_layers, 2, num_kv_heads, prefix_len, head_dim]
    shape = list(prefix.shape)
    if prefix.dim() != 5 or shape[1] != 2:
        raise InvalidPrefix(f"prefix shape {shape} is not a prefix: {_expected(spec)}")
    layers, _, heads, _, head_dim = shape
    if (layers, heads, head_dim) != (spec.num_layers, spec.num_kv_heads, spec.head_dim):
        raise ModelMismatch(f"prefix shape {shape} does not fit this model: {_expected(spec)}")
    return prefix


# PEFT types saved as a KV prefix `prompt_embeddings` [P, num_layers * 2 * num_kv_heads * head_dim]
# that PEFT serves as `past_key_values`: prefix tuning (its projection already applied) and Cartridges.
KV_PEFT_TYPES = ("PREFIX_TUNING", "CARTRIDGE")


def parse_peft_config(config_json: bytes, allowed: tuple[str, ...] = KV_PEFT_TYPES) -> dict[str, Any]:
    try:
        config = json.loads(config_json)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidPrefix(f"config is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidPrefix("config must be a JSON object (a PEFT adapter_config.json)")
    peft_type = config.get("peft_type")
    if peft_type not in allowed:
        raise InvalidPrefix(f"config has peft_type={peft_type!r}; supported here: {', '.join(allowed)}")
    submodules = config.get("num_transformer_submodules")
    if submodules not in (None, 1):
        raise InvalidPrefix(
            f"config has num_transformer_submodules={submodules!r}; only causal LMs (1) are supported"
        )
    return config


def config_int(config: dict[str, Any], key: str, required: bool) -> int | None:
    value = config.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidPrefix(f"config field {key} must be an integer, got {value!r}")
    return value


def _canonical_from_peft(
    spec: PrefixSpec, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> torch.Tensor:
    keys = [k for k in tensors if k == _PEFT_KEY or k.endswith("." + _PEFT_KEY)]
    if len(keys) != 1:
        raise InvalidPrefix(
            f"expected one tensor named '{_PEFT_KEY}' in a PEFT checkpoint, found tensors {sorted(tensors)}"
        )
    emb = tensors[keys[0]]  # [P, num_layers * 2 * num_kv_heads * head_dim]
    width = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
    if emb.dim() != 2:
        raise InvalidPrefix(f"{_PEFT_KEY} has shape {list(emb.shape)}; expected 2 dims [P, {width}]")
    num_rows = emb.shape[0]
    num_virtual_tokens = config_int(config, "num_virtual_tokens", required=True)
    if num_virtual_tokens != num_rows:
        raise InvalidPrefix(
            f"config says num_virtual_tokens={num_virtual_tokens} but the tensor has {num_rows} rows"
        )
    # PEFT stores the key/value heads of a GQA model as num_attention_heads and token_dim.
    expected = {
        "num_layers": spec.num_layers,
        "num_attention_heads": spec.num_kv_heads,
        "token_dim": spec.num_kv_heads * spec.head_dim,
    }
    for key, want in expected.items():
        got = config_int(config, key, required=False)
        if got is not None and got != want:
            raise ModelMismatch(f"config says {key}={got} but this model needs {key}={want}")
    if emb.shape[1] != width:
        raise ModelMismatch(
            f"{_PEFT_KEY} width {emb.shape[1]} does not fit this model: expected "
            f"num_layers*2*num_kv_heads*head_dim = {spec.num_layers}*2*{spec.num_kv_heads}*{spec.head_dim}"
            f" = {width}"
        )
    check_values(emb)  # view() below needs a floating, well-formed tensor; fail early and clearly
    # Same layout as PeftModel.get_prompt: view(P, L*2, H, D) then per layer [key, value].
    view = emb.reshape(num_rows, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    return view.permute(1, 2, 3, 0, 4)  # [num_layers, 2, num_kv_heads, P, head_dim]


def check_values(t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES.values():
        raise InvalidPrefix(
            f"prefix dtype {dtype_name(t.dtype)} is not supported: expected one of {list(_DTYPES)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise InvalidPrefix("prefix contains NaN or Inf values")


def finish_prefix(spec: PrefixSpec, prefix: torch.Tensor) -> torch.Tensor:
    prefix_len = prefix.shape[3]
    if not 1 <= prefix_len <= spec.max_prefix_len:
        raise InvalidPrefix(
            f"prefix_len {prefix_len} is out of range: expected 1..{spec.max_prefix_len} for this model"
        )
    check_values(prefix)
    out = prefix.to(device="cpu", dtype=spec.dtype).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise InvalidPrefix(f"prefix contains NaN or Inf values after conversion to {dtype_name(spec.dtype)}")
    bound = max_abs_value(spec.dtype, spec.head_dim)
    largest = float(out.abs().max())
    if largest > bound:
        raise InvalidPrefix(
            f"prefix values reach |x| = {largest:.4g}; at most {bound:.4g} in {dtype_name(spec.dtype)} "
            f"with head_dim {spec.head_dim} (beyond it attention scores overflow to Inf/NaN)"
        )
    return out


def max_abs_value(dtype: torch.dtype, head_dim: int) -> float:
    """The largest |x| a prefix may hold when served in `dtype`: sqrt(dtype max / head_dim).

    An attention score sums `head_dim` products q_i * k_i; with |q_i| and |k_i| at most B it is
    at most head_dim * B^2, finite while B <= sqrt(max / head_dim). Values are bounded alike:
    what attention returns (at most max |v|) goes on through the model in the same dtype.
    float32 and bfloat16 with head_dim 128: 1.6e18; float16: 22.6 (head_dim 64: 32).
    """
    return math.sqrt(torch.finfo(dtype).max / head_dim)


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian element bytes of `t` in row-major order (works for bfloat16)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `tensor_to_bytes`; raises InvalidPrefix when `data` does not fit `shape`."""
    torch_dtype = dtype_from_name(dtype)
    if any(d < 0 for d in shape):
        raise InvalidPrefix(f"invalid tensor shape {list(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * torch_dtype.itemsize
    if len(data) != expected:
        raise InvalidPrefix(
            f"stored tensor has {len(data)} bytes but {dtype} {list(shape)} needs {expected} bytes"
        )
    if numel == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> `"float32"`."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """`"float32"` -> `torch.float32`; only the floating dtypes a prefix may have."""
    dtype = _DTYPES.get(name.removeprefix("torch."))
    if dtype is None:
        raise InvalidPrefix(f"unknown dtype {name!r}: expected one of {list(_DTYPES)}")
    return dtype
