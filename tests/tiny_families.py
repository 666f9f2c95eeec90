"""Tiny checkpoints laid out as each model family ships them, real tokenizer files included.

Tokenizers are trained here, in a fraction of a second, on a few kilobytes of generated text:
a sentencepiece `tokenizer.model` (Llama-2, Mistral v0.1, Phi-3 and Gemma ship one; here it is
the only tokenizer file, no tokenizer.json), a tiktoken `tokenizer.model` (Llama-3's original
format) trained with tiktoken's own trainer, or a byte-level BPE `tokenizer.json` built with
`tokenizers` (Llama-3, Qwen2). Models are built from a tiny config of the family (2 layers,
GQA where the family has it, `initializer_range=0.3` for wide greedy margins), then saved with
`save_pretrained` (sharded when asked). Nothing is downloaded.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece
import tiktoken
import torch
from tiktoken._educational import bpe_train
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
)

MAX_POSITIONS = 256
_WORDS = (
    "the a one every prefix server model token batch cache layer head tenant task prompt answer "
    "quick brown fox jumps over lazy dog river mountain bread coffee rain sunny cloudy tomorrow "
    "kitchen table garden window story king queen small large green blue red seven twelve "
    "learns writes reads serves waits runs sleeps sings opens closes finds keeps café naïve über"
).split()


@dataclass(frozen=True)
class Family:
    """How a family ships: the architecture's config, and its tokenizer's file kind and specials."""

    name: str  # e.g. "llama-2"
    arch: str  # which tiny config (family_config)
    tokenizer: str  # "sentencepiece" / "tiktoken" (a tokenizer.model alone) or "bpe" (tokenizer.json)
    tokenizer_class: str
    specials: dict[str, str | None]  # bos / eos / unk / pad token strings
    title: str  # as the table of tested families in docs/models.md names it


_LLAMA2 = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None}
_LLAMA3 = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "unk": None, "pad": None}
_GEMMA = {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>"}
_QWEN2 = {"bos": None, "eos": "<|endoftext|>", "unk": None, "pad": "<|endoftext|>"}
FAMILIES = {
    family.name: family
    for family in [
        Family("llama-2", "llama", "sentencepiece", "LlamaTokenizer", _LLAMA2, "Llama 2"),
        Family("mistral", "mistral", "sentencepiece", "LlamaTokenizer", _LLAMA2, "Mistral"),
        Family("phi-3", "phi3", "sentencepiece", "LlamaTokenizer", _LLAMA2, "Phi-3"),
        Family("gemma", "gemma", "sentencepiece", "GemmaTokenizer", _GEMMA, "Gemma"),
        Family("llama-3", "llama", "bpe", "PreTrainedTokenizerFast", _LLAMA3, "Llama 3"),
        Family(
            "llama-3-tiktoken",
            "llama",
            "tiktoken",
            "PreTrainedTokenizerFast",
            _LLAMA3,
            "Llama 3 (original files)",
        ),
        Family("qwen2", "qwen2", "bpe", "Qwen2Tokenizer", _QWEN2, "Qwen2"),
    ]
}


def corpus(num_lines: int = 150, seed: int = 0) -> list[str]:
    """A few kilobytes of sentences (ASCII, accents, digits): what the tokenizers learn from."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        lines.append(f"{' '.join(words).capitalize()}{rng.choice('.,!?')} {i * 7 % 100}")
    return lines


def train_sentencepiece(family: Family, vocab_size: int = 400) -> bytes:
    """A BPE sentencepiece model proto with byte fallback and the family's special pieces."""
    ids = (
        {"pad": 0, "eos": 1, "bos": 2, "unk": 3} if family.specials["pad"] else {"unk": 0, "bos": 1, "eos": 2}
    )
    pieces = {f"{name}_piece": family.specials[name] for name in ids}
    writer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=writer, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, minloglevel=2, pad_id=ids.get("pad", -1), bos_id=ids["bos"], eos_id=ids["eos"],
        unk_id=ids["unk"], **pieces,
    )  # fmt: skip
    return writer.getvalue()


def train_byte_bpe(family: Family, vocab_size: int = 500) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 / Qwen2 style) with the family's specials first."""
    specials = sorted(
        {token for token in family.specials.values() if token}, key=list(family.specials.values()).index
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    bos = family.specials["bos"]
    if bos:  # as Llama-3's tokenizer.json: BOS in front when special tokens are asked for
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return tokenizer


# transformers' TikTokenConverter reads a tiktoken file with this split pattern (Llama-3's, cl100k's)
_TIKTOKEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@functools.cache
def train_tiktoken(vocab_size: int = 400) -> dict[bytes, int]:
    """Byte-pair ranks (tiktoken's own trainer, pure Python: trained once) over the corpus:
    token bytes -> rank. Read-only."""
    return bpe_train("\n".join(corpus()), vocab_size, _TIKTOKEN_PATTERN, visualise=None)


def tiktoken_encoding() -> tiktoken.Encoding:
    """tiktoken's own encoder over `train_tiktoken()`'s ranks: what a converted file must match."""
    return tiktoken.Encoding(
        "tiny", pat_str=_TIKTOKEN_PATTERN, mergeable_ranks=train_tiktoken(), special_tokens={}
    )


def _write_tiktoken(family: Family, path: Path) -> dict[str, Any]:
    """A tiktoken BPE file (`base64(token) rank` lines, as Llama-3's original tokenizer.model);
    returns the tokenizer_config entries that put the specials right after the ranks."""
    ranks = train_tiktoken()
    lines = (
        f"{base64.b64encode(token).decode()} {rank}\n"
        for token, rank in sorted(ranks.items(), key=lambda x: x[1])
    )
    path.write_text("".join(lines))
    specials = [token for token in family.specials.values() if token]
    decoder = {str(len(ranks) + i): {"content": token, "special": True} for i, token in enumerate(specials)}
    return {"added_tokens_decoder": decoder}


def save_tokenizer(family: Family, path: Path) -> Any:
    """Write the family's tokenizer files to `path`; return the tokenizer transformers loads from them."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_config: dict[str, Any] = {}
    if family.tokenizer == "sentencepiece":
        (path / "tokenizer.model").write_bytes(train_sentencepiece(family))
    elif family.tokenizer == "tiktoken":
        tokenizer_config = _write_tiktoken(family, path / "tokenizer.model")
    else:
        train_byte_bpe(family).save(str(path / "tokenizer.json"))
    special_map = {f"{name}_token": token for name, token in family.specials.items() if token}
    tokenizer_config |= {
        "tokenizer_class": family.tokenizer_class,
        "model_max_length": MAX_POSITIONS,
        "add_bos_token": family.specials["bos"] is not None,
        "add_eos_token": False,
        **special_map,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return AutoTokenizer.from_pretrained(path)


def family_config(family: Family, tokenizer: Any) -> PretrainedConfig:
    """A 2-layer config of the family, its vocabulary and special ids taken from `tokenizer`."""
    ids = {
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": MAX_POSITIONS, "initializer_range": 0.3, "num_hidden_layers": 2,
    }  # fmt: skip
    if family.arch == "llama":
        return LlamaConfig(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, **ids
        )
    if family.arch == "mistral":  # v0.1: GQA 4:1 and a sliding window (beyond these tiny contexts)
        return MistralConfig(
            hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96, **ids
        )
    if family.arch == "phi3":  # fused qkv / gate-up projections; its auto_map, as Phi-3 repos ship it
        config = Phi3Config(
            hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, **ids
        )
        config.auto_map = {
            "AutoConfig": "configuration_phi3.Phi3Config",
            "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
        }
        return config
    if family.arch == "gemma":  # multi-query attention, explicit head_dim, tied embeddings
        return GemmaConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=64,
            **ids,
        )
    if family.arch == "qwen2":  # q/k/v biases, tied embeddings
        return Qwen2Config(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            tie_word_embeddings=True, **ids,
        )  # fmt: skip
    raise ValueError(family.arch)


def save_family_model(name: str, path: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """A tiny checkpoint of family `name` (see FAMILIES) in `path`, as `save_pretrained` writes it."""
    family = FAMILIES[name]
    tokenizer = save_tokenizer(family, path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


REMOTE_CODE_FILE = "modeling_tiny_remote.py"
_REMOTE_CODE = '''"""A model type transformers does not know: only this file can build it."""

from transformers import LlamaConfig, LlamaForCausalLM


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny-remote"


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


def save_remote_code_model(path: Path, seed: int = 0) -> Path:
    """The Llama-2 family checkpoint of `seed`, renamed to a model type whose code ships beside it
    (config.json `auto_map` -> REMOTE_CODE_FILE), as custom-code repositories on the hub do."""
    save_family_model("llama-2", path, seed)
    (path / REMOTE_CODE_FILE).write_text(_REMOTE_CODE)
    config = json.loads((path / "config.json").read_text())
    module = REMOTE_CODE_FILE.removesuffix(".py")
    config.update(
        model_type="tiny-remote",
        architectures=["TinyRemoteForCausalLM"],
        auto_map={
            "AutoConfig": f"{module}.TinyRemoteConfig",
            "AutoModelForCausalLM": f"{module}.TinyRemoteForCausalLM",
        },
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def place_in_hub_cache(model_dir: Path, hf_home: Path, repo_id: str) -> Path:
    """Copy a checkpoint into `$HF_HOME/hub` as `hf download` leaves it (refs/main -> a snapshot)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit
