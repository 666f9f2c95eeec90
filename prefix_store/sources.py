"""Every kind of upload as a `PrefixSource`: KV prefixes, PEFT checkpoints, text prompts.

- canonical KV (`prefix` tensor), PEFT prefix tuning and PEFT Cartridges (a KV prefix trained
  directly as parameters, saved in prefix tuning's layout): a KV prefix as uploaded;
- PEFT prompt tuning and P-tuning: input-layer virtual token embeddings `[P, hidden]`
  (PEFT saves P-tuning's encoder output, so both are plain embeddings here);
- text: a system prompt.
The last two become a KV prefix by one pass of the frozen model (done by the engine).
"""

from typing import Any

import torch

from prefix_store.entry import PrefixSource, PrefixSpec
from prefix_store.errors import InvalidPrefix, ModelMismatch
from prefix_store.format import (
    KV_PEFT_TYPES,
    check_values,
    config_int,
    load_safetensors,
    parse_peft_config,
    parse_upload,
)

KINDS_BY_PEFT_TYPE = {
    "PREFIX_TUNING": "prefix_tuning",
    "CARTRIDGE": "cartridge",
    "PROMPT_TUNING": "prompt_tuning",
    "P_TUNING": "p_tuning",
}
_PEFT_KEY = "prompt_embeddings"
MAX_TEXT_CHARS = 1_000_000


def parse_source(
    spec: PrefixSpec,
    weights: bytes | None,
    config_json: bytes | None,
    text: str | None,
    fingerprint: str | None = None,
) -> PrefixSource:
    """Validate an upload of any kind. Raises InvalidPrefix / ModelMismatch."""
    if text is not None:
        if weights is not None or config_json is not None:
            raise InvalidPrefix("send either a `text` part or `weights` (+ `config`), not both")
        if not text.strip():
            raise InvalidPrefix("the text prefix is empty")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidPrefix(f"the text prefix has {len(text)} characters; at most {MAX_TEXT_CHARS}")
        return PrefixSource("text", text=text)
    if weights is None:
        raise InvalidPrefix("missing form part `weights` (a safetensors file) or `text`")
    if config_json is None:
        return PrefixSource("kv", kv=parse_upload(spec, weights, None, fingerprint))
    config = parse_peft_config(config_json, allowed=tuple(KINDS_BY_PEFT_TYPE))
    kind = KINDS_BY_PEFT_TYPE[config["peft_type"]]
    if config["peft_type"] in KV_PEFT_TYPES:
        return PrefixSource(kind, kv=parse_upload(spec, weights, config_json, fingerprint))
    return PrefixSource(kind, embeddings=_soft_prompt(spec, load_safetensors(weights), config))


def _soft_prompt(spec: PrefixSpec, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
    """PEFT prompt-tuning / P-tuning `prompt_embeddings` `[P, hidden]`, checked against the model."""
    keys = [k for k in tensors if k == _PEFT_KEY or k.endswith("." + _PEFT_KEY)]
    if len(keys) != 1:
        raise InvalidPrefix(f"expected one tensor named '{_PEFT_KEY}', found tensors {sorted(tensors)}")
    emb = tensors[keys[0]]
    if emb.dim() != 2:
        raise InvalidPrefix(f"{_PEFT_KEY} has shape {list(emb.shape)}; expected [P, {spec.hidden_size}]")
    num_virtual_tokens = config_int(config, "num_virtual_tokens", required=True)
    if num_virtual_tokens != emb.shape[0]:
        raise InvalidPrefix(
            f"config says num_virtual_tokens={num_virtual_tokens} but the tensor has {emb.shape[0]} rows"
        )
    token_dim = config_int(config, "token_dim", required=False)
    if token_dim is not None and token_dim != spec.hidden_size:
        raise ModelMismatch(
            f"config says token_dim={token_dim} but this model's hidden size is {spec.hidden_size}"
        )
    if emb.shape[1] != spec.hidden_size:
        raise ModelMismatch(
            f"{_PEFT_KEY} width {emb.shape[1]} does not fit this model: expected hidden size "
            f"{spec.hidden_size}"
        )
    if not 1 <= emb.shape[0] <= spec.max_prefix_len:
        raise InvalidPrefix(
            f"{emb.shape[0]} virtual tokens is out of range: expected 1..{spec.max_prefix_len}"
        )
    check_values(emb)
    out = emb.to(dtype=spec.dtype).contiguous()
    check_values(out)
    return out
