"""Load the frozen causal LM and its tokenizer; build the embedded demo model on first use.

Where the files come from (local dir, hub cache, offline by default) and whether the model's own
code may run is decided by `model_source.locate_model`; this module only loads what it found.
"""

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from server.engine.demo_model import ensure_demo_model
from server.engine.model_source import TRUST_FLAG, ModelSource, ModelSourceError, locate_model
from server.engine.precision import needs_fallback

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
    trust_remote_code: bool = False  # run code the model ships (config.json auto_map)


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
    # sentencepiece byte-fallback tokens (`<0xNN>`): their text can still change with the next id
    byte_ids: frozenset[int] = frozenset()

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
    """The model's position limit, or its sliding attention window when that is smaller."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            window = _sliding_window(config)
            if window is not None and window < value:
                log.info("the model attends through a sliding window: context capped at %d positions", window)
                return window
            return value
    raise ValueError("cannot tell the model's maximum number of positions from its config")


def _sliding_window(config: Any) -> int | None:
    """The attention window of a model whose layers (all or some) see only the last W positions
    (Mistral v0.1, Phi-3-mini, Gemma 2), else None. The engine attends to every position of a
    row, which is the same thing only while a row fits the window: so the window caps the context."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(window, int) or window <= 0:
        return None
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def load_model(options: ModelOptions) -> LoadedModel:
    """Load through `from_pretrained` (the demo model too), frozen, on the chosen device."""
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if options.model is None:
        source = locate_model(str(ensure_demo_model(options.data_dir / "models" / "demo")), False)
    else:
        source = locate_model(options.model, options.trust_remote_code)
    _log_source(source, options.trust_remote_code, device, dtype)
    _warn_if_emulated(dtype, device)
    files = {"trust_remote_code": options.trust_remote_code, "local_files_only": source.is_offline}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **files)
        model = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=dtype, attn_implementation="sdpa", **files
        )
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        # e.g. a tokenizer that only its own code can build (the config check saw the model only)
        raise ModelSourceError(f"model {source.name} needs its own code to load: pass {TRUST_FLAG}") from exc
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
        byte_ids=byte_fallback_ids(tokenizer),
    )


def byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of `<0xNN>` tokens: a run of them that is not valid UTF-8 decodes to one U+FFFD per
    byte, so text shown after one of them could change when the next id arrives."""
    return frozenset(i for token, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(token))


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters of text one token can stand for: the longest vocabulary entry or added
    token (a byte-level or sentencepiece entry is at least as long as the text it matches). A text
    of more than `n` times this many characters has more than `n` tokens, known without tokenizing
    it (for tokenizers that drop no characters: normalizers that delete text, or added tokens that
    swallow the whitespace around them, can fit more)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    lengths = [len(token) for token in tokenizer.get_vocab()] + [len(str(t)) for t in added]
    return max([1, *lengths])


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _warn_if_emulated(dtype: torch.dtype, device: torch.device) -> None:
    """`--dtype bfloat16|float16` on a CPU without native support still starts, but says what it costs."""
    slow = needs_fallback(dtype, device)
    if slow is not None:
        log.warning(
            "--dtype %s: %s, so serving can be up to that much slower than in float32; "
            "use --dtype float32 (or auto, float32 on CPU) here",
            slow.dtype,
            slow.reason(),
        )


def _log_source(
    source: ModelSource, trust_remote_code: bool, device: torch.device, dtype: torch.dtype
) -> None:
    where = "" if source.location == source.name else f" from {source.location}"
    log.info("loading model %s%s on %s as %s", source.name, where, device, dtype)
    if source.code_files and trust_remote_code:
        log.warning(
            "--trust-remote-code: running the code model %s ships (%s)",
            source.name,
            ", ".join(source.code_files),
        )
    elif source.code_files:
        log.info(
            "model %s ships code (%s) that is not run: transformers' own %s is used",
            source.name,
            ", ".join(source.code_files),
            source.model_type,
        )
