"""Load the frozen causal LM and its tokenizer; build the embedded demo model on first use."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from server.engine.demo_model import ensure_demo_model

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelOptions:
    """What to load and where (built from Settings by the app)."""

    model: str | None  # HF hub id or local dir; None = the embedded demo model
    device: str  # auto | cpu | cuda
    dtype: str  # auto | float32 | bfloat16 | float16
    data_dir: Path
    max_model_len: int | None = None


@dataclass(frozen=True)
class LoadedModel:
    """The model in inference mode plus the facts the engine needs about it."""

    name: str
    model: PreTrainedModel
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    max_positions: int  # the model's own position limit
    vocab_size: int  # rows of the input embedding
    eos_ids: frozenset[int]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> frozenset[int]:
    gen_config = getattr(model, "generation_config", None)
    eos = getattr(gen_config, "eos_token_id", None) if gen_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _max_positions(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("cannot tell the model's maximum number of positions from its config")


def load_model(options: ModelOptions) -> LoadedModel:
    """Load through `from_pretrained` (the demo model too), frozen, on the chosen device."""
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    source = options.model or str(ensure_demo_model(options.data_dir / "models" / "demo"))
    log.info("loading model %s on %s as %s", source, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    return LoadedModel(
        name=options.model or "demo",
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        max_positions=_max_positions(model.config),
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        eos_ids=_eos_ids(model, tokenizer),
    )
