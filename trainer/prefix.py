"""The prefix-tuning model (PEFT), its text initialisation, greedy decoding and the export.

Two methods: prefix tuning (Li & Liang; optionally through the MLP reparameterisation) and
Cartridges (PEFT `CARTRIDGE`: the KV prefix itself is the parameter, its first token frozen as an
attention sink, started at the activations of real text).

The exported prefix is the canonical tensor the server stores,
`[num_layers, 2, num_kv_heads, prefix_len, head_dim]`: PEFT's prompt encoder is run once (so
the MLP reparameterisation P = MLP(P') is applied) and only its output is kept, exactly as
the paper drops the MLP after training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from peft import CartridgeConfig, PeftConfig, PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from prefix_store.fingerprint import model_fingerprint, prefix_spec_for


def load_base(model: str) -> tuple[PreTrainedModel, Any]:
    """The frozen LM and its tokenizer, loaded as the server loads them on CPU (float32)."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    base.requires_grad_(False)
    return base, tokenizer


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every base parameter's bytes: equal before and after = nothing changed."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


METHODS = ("prefix", "cartridge")


def prefix_model(
    base: PreTrainedModel, prefix_len: int, mlp_hidden: int | None, method: str = "prefix"
) -> PeftModel:
    """PEFT prefix tuning (`mlp_hidden` None trains P directly, else through P = MLP(P')), or a
    Cartridge (`method="cartridge"`: P directly, first virtual token frozen; `mlp_hidden` unused)."""
    config: PeftConfig
    if method == "cartridge":
        config = CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_len, num_frozen_tokens=1)
    else:
        config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix_len,
            prefix_projection=mlp_hidden is not None,
            encoder_hidden_size=mlp_hidden or 1,
        )
    return get_peft_model(base, config)  # type: ignore[return-value]


def canonical_prefix(model: PeftModel) -> torch.Tensor:
    """The KV prefix PEFT feeds the model, as `[num_layers, 2, num_kv_heads, P, head_dim]`."""
    config = model.active_peft_config
    encoder: Any = model.prompt_encoder[model.active_adapter]
    tokens = torch.arange(config.num_virtual_tokens, device=encoder.embedding.weight.device)[None]
    with torch.no_grad():
        flat = encoder(tokens)[0].float()  # [P, num_layers * 2 * heads * head_dim]
    heads = config.num_attention_heads
    view = flat.reshape(config.num_virtual_tokens, config.num_layers, 2, heads, config.token_dim // heads)
    return view.permute(1, 2, 3, 0, 4).contiguous()  # same layout as PeftModel.get_prompt


def init_from_text(model: PeftModel, tokenizer: Any, text: str, fit_steps: int = 300) -> None:
    """Start the prefix at the activations of real words (Li & Liang: helps most with
    little data). The text's ids are repeated or cut to P; without the MLP they are copied
    in, with it the MLP is fitted to them by a short regression (it has no exact inverse)."""
    config = model.active_peft_config
    length = config.num_virtual_tokens
    ids = list(tokenizer.encode(text, add_special_tokens=False)) or [0]
    ids = (ids * (length // len(ids) + 1))[:length]
    base = model.get_base_model()
    with torch.no_grad():
        cache = base(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
        layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
        target = torch.stack(layers).permute(3, 0, 1, 2, 4).reshape(length, -1)  # PEFT's flat layout
    encoder: Any = model.prompt_encoder[model.active_adapter]
    if not getattr(encoder, "prefix_projection", False):
        encoder.load_prompt_embeddings(target)  # a Cartridge splits it into its frozen and trained parts
        return
    tokens = torch.arange(length)[None]
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    for _ in range(fit_steps):
        loss = torch.nn.functional.mse_loss(encoder(tokens)[0], target)
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def greedy(
    model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None
) -> list[int]:
    """Greedy continuation by repeated full forward passes (the reference the server must match)."""
    model.eval()
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if next_id == eos_id:
            break
        out.append(next_id)
        ids.append(next_id)
    return out


def export(model: PeftModel, base_source: str, out: Path) -> Path:
    """Write `out/prefix.safetensors` (canonical, float32, `model_fingerprint` in its metadata)
    and PEFT's own checkpoint under `out/peft/`; returns the canonical file's path."""
    base = model.get_base_model()
    fingerprint = model_fingerprint(base, base.config)
    prefix = canonical_prefix(model)
    spec = prefix_spec_for(base.config, torch.float32, 2**31)
    expected = (spec.num_layers, 2, spec.num_kv_heads, prefix.shape[3], spec.head_dim)
    assert tuple(prefix.shape) == expected, (tuple(prefix.shape), expected)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prefix.safetensors"
    safetensors.torch.save_file(
        {"prefix": prefix}, path, metadata={"model_fingerprint": fingerprint, "base_model": base_source}
    )
    model.save_pretrained(str(out / "peft"))
    return path
