"""Soft prompts and text prompts become KV prefixes by one pass of the frozen model."""

import torch
from transformers import PreTrainedModel


@torch.inference_mode()
def compute_prefix_kv(
    model: PreTrainedModel, device: torch.device, token_ids: list[int] | None, embeddings: torch.Tensor | None
) -> torch.Tensor:
    """KV of positions `0..P-1` for tokens or input embeddings `[P, hidden]`.

    Returns `[num_layers, 2, num_kv_heads, P, head_dim]` on the CPU. Positions start at 0,
    as PEFT places prompt-tuning virtual tokens and as a system prompt sits before a prompt.
    """
    if embeddings is not None:
        dtype = next(model.parameters()).dtype
        out = model(
            inputs_embeds=embeddings[None].to(device=device, dtype=dtype), use_cache=True, logits_to_keep=1
        )
    else:
        out = model(input_ids=torch.tensor([token_ids], device=device), use_cache=True, logits_to_keep=1)
    layers = out.cache.layers  # each: keys/values [1, kv_heads, P, head_dim]
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers]).cpu()
