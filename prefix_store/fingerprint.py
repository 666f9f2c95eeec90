"""Model fingerprint and the prefix shape a model needs.

Prefixes are stored per fingerprint: a prefix is only valid for the exact weights it was
trained against. The fingerprint hashes a deterministic sample of the weights cast to
float32, so one checkpoint loaded as float32 and as bfloat16 gets the same fingerprint only
when its weights are exactly representable in both (e.g. a bfloat16 checkpoint); otherwise
each load dtype has its own fingerprint and its own prefixes.
"""

import hashlib
import json
import re
from typing import Any

import torch

from prefix_store.entry import PrefixSpec

_MAX_SAMPLED_PARAMS = 16
_MAX_SAMPLED_ELEMENTS = 4096


def _text_config(config: Any) -> Any:
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _architecture(config: Any) -> dict[str, Any]:
    cfg = _text_config(config)
    num_heads = int(cfg.num_attention_heads)
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // num_heads
    return {
        "model_type": str(getattr(cfg, "model_type", "") or "model"),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": int(head_dim),
        "vocab_size": int(cfg.vocab_size),
    }


def model_fingerprint(model: torch.nn.Module, config: Any) -> str:
    """A readable id of the model's architecture and weights, e.g. `gpt2-L4-H4-D16-<16 hex>`.

    The hash covers the architecture facts, the name and shape of every parameter, and the
    first 4096 elements (as float32) of at most 16 parameters spread evenly over the
    name-sorted parameter list, so that differences late in the model are seen too.
    """
    arch = _architecture(config)
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    params = sorted(model.named_parameters(), key=lambda item: item[0])
    for name, param in params:
        digest.update(f"{name}:{list(param.shape)};".encode())
    for name, param in _sample(params):
        values = param.detach().reshape(-1)[:_MAX_SAMPLED_ELEMENTS].to(device="cpu", dtype=torch.float32)
        digest.update(name.encode())
        digest.update(values.contiguous().numpy().tobytes())
    model_type = re.sub(r"[^A-Za-z0-9_.]", "_", arch["model_type"])
    heads = f"H{arch['num_attention_heads']}"
    if arch["num_key_value_heads"] != arch["num_attention_heads"]:
        heads += f"-KV{arch['num_key_value_heads']}"
    return f"{model_type}-L{arch['num_hidden_layers']}-{heads}-D{arch['head_dim']}-{digest.hexdigest()[:16]}"


def _sample(params: list[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.nn.Parameter]]:
    if len(params) <= _MAX_SAMPLED_PARAMS:
        return params
    last = len(params) - 1
    picks = sorted({round(i * last / (_MAX_SAMPLED_PARAMS - 1)) for i in range(_MAX_SAMPLED_PARAMS)})
    return [params[i] for i in picks]


def prefix_spec_for(config: Any, dtype: torch.dtype, max_positions: int) -> PrefixSpec:
    """The prefix shape this model needs: a prefix may use at most `max_positions - 2` positions,
    which leaves room for a prompt of one token and one generated token."""
    if max_positions < 3:
        raise ValueError(f"max_positions must be at least 3, got {max_positions}")
    arch = _architecture(config)
    return PrefixSpec(
        num_layers=arch["num_hidden_layers"],
        num_kv_heads=arch["num_key_value_heads"],
        head_dim=arch["head_dim"],
        dtype=dtype,
        max_prefix_len=max_positions - 2,
        hidden_size=arch["hidden_size"],
    )
