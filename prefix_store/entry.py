"""Named records passed across the store boundary (torch-free at run time: tensors are only
named in annotations, so the HTTP layer can import these records)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prefix_store.meta import PrefixMeta

if TYPE_CHECKING:
    import torch

__all__ = ["PrefixEntry", "PrefixMeta", "PrefixSource", "PrefixSpec"]


@dataclass(frozen=True)
class PrefixSpec:
    """What a prefix must look like to fit the loaded model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_prefix_len: int  # a prefix may not use more positions than this
    hidden_size: int = 0  # width of input embeddings (soft prompts are [P, hidden_size])

    def shape(self, prefix_len: int) -> tuple[int, int, int, int, int]:
        """Canonical shape `[num_layers, 2, num_kv_heads, prefix_len, head_dim]`."""
        return (self.num_layers, 2, self.num_kv_heads, prefix_len, self.head_dim)


@dataclass(frozen=True)
class PrefixEntry:
    """A prefix ready to use: metadata plus its key/value tensor."""

    meta: PrefixMeta
    kv: torch.Tensor  # [num_layers, 2, num_kv_heads, prefix_len, head_dim]

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class PrefixSource:
    """A parsed upload: a ready KV prefix, or what the frozen model must run once to make one."""

    kind: str  # kv | prefix_tuning | cartridge | prompt_tuning | p_tuning | text
    kv: torch.Tensor | None = None  # [num_layers, 2, num_kv_heads, P, head_dim], ready to store
    embeddings: torch.Tensor | None = None  # [P, hidden_size] input embeddings (soft prompt)
    text: str | None = None  # a system prompt, tokenized by the server without special tokens
