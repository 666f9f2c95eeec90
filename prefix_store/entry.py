"""Named records passed across the store boundary."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixSpec:
    """What a prefix must look like to fit the loaded model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_prefix_len: int  # a prefix may not use more positions than this

    def shape(self, prefix_len: int) -> tuple[int, int, int, int, int]:
        """Canonical shape `[num_layers, 2, num_kv_heads, prefix_len, head_dim]`."""
        return (self.num_layers, 2, self.num_kv_heads, prefix_len, self.head_dim)


@dataclass(frozen=True)
class PrefixMeta:
    """Metadata stored beside every prefix version."""

    task_id: str
    version: int
    prefix_len: int
    num_bytes: int
    dtype: str  # torch dtype name without the "torch." part, e.g. "float32"
    model_fingerprint: str
    created_at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class PrefixEntry:
    """A prefix ready to use: metadata plus its key/value tensor."""

    meta: PrefixMeta
    kv: torch.Tensor  # [num_layers, 2, num_kv_heads, prefix_len, head_dim]

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
