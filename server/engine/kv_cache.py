"""Pre-allocated slot KV cache and the `transformers.Cache` adapter that writes into it.

Every running row owns one slot: `[kv_heads, max_len, head_dim]` per layer for keys and
values. Positions `0..P-1` of a slot hold the row's prefix, then its own tokens follow.
Running rows are kept compact in slots `0..n-1`, so attention gets a view of the slot
tensors, never a gathered copy.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass(frozen=True)
class KVLayout:
    """Geometry of the slot cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_slots: int
    max_len: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_slot(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.max_len * self.head_dim * elem


class SlotKVCache:
    """Slot tensors for every layer; bookkeeping of lengths lives with the scheduler."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        shape = (layout.num_slots, layout.num_kv_heads, layout.max_len, layout.head_dim)
        # zeros, not empty: stale or never-written positions must stay finite under the mask
        self.keys = [
            torch.zeros(shape, dtype=layout.dtype, device=layout.device) for _ in range(layout.num_layers)
        ]
        self.values = [
            torch.zeros(shape, dtype=layout.dtype, device=layout.device) for _ in range(layout.num_layers)
        ]

    def load_prefix(self, slot: int, kv: torch.Tensor) -> None:
        """Copy a prefix `[num_layers, 2, kv_heads, P, head_dim]` into positions `0..P-1` of `slot`."""
        prefix_len = kv.shape[3]
        for layer in range(self.layout.num_layers):
            self.keys[layer][slot, :, :prefix_len].copy_(kv[layer, 0], non_blocking=True)
            self.values[layer][slot, :, :prefix_len].copy_(kv[layer, 1], non_blocking=True)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (compaction)."""
        for layer in range(self.layout.num_layers):
            self.keys[layer][dst, :, :length].copy_(self.keys[layer][src, :, :length])
            self.values[layer][dst, :, :length].copy_(self.values[layer][src, :, :length])


@dataclass(frozen=True)
class WritePlan:
    """Where a forward pass writes its new K/V and how much of each slot attention sees.

    The forward covers the contiguous slots `slot_start..slot_start+rows-1`; the new token
    `j` of local row `i` goes to position `positions[i, j]`, for the valid `(i, j)` pairs
    listed flat in `row_index` / `token_index` / `position_index` (padding is never written).
    """

    slot_start: int
    num_rows: int
    kv_len: int  # attention reads positions 0..kv_len-1 of every slot
    row_index: torch.Tensor  # [num_valid] local row of each valid new token
    token_index: torch.Tensor  # [num_valid] its index along the query axis
    position_index: torch.Tensor  # [num_valid] its cache position


class _SlotLayer(CacheLayerMixin):
    """One layer's view of the slot tensors for a single forward pass."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, plan: WritePlan) -> None:
        super().__init__()
        self._slot_keys = keys
        self._slot_values = values
        self._plan = plan
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [rows, kv_heads, q, head_dim]
        plan = self._plan
        rows = slice(plan.slot_start, plan.slot_start + plan.num_rows)
        slot_keys = self._slot_keys[rows]  # [rows, kv_heads, max_len, head_dim] (view)
        slot_values = self._slot_values[rows]
        new_k = key_states[plan.row_index, :, plan.token_index]  # [num_valid, kv_heads, head_dim]
        new_v = value_states[plan.row_index, :, plan.token_index]
        slot_keys[plan.row_index, :, plan.position_index] = new_k.to(slot_keys.dtype)
        slot_values[plan.row_index, :, plan.position_index] = new_v.to(slot_values.dtype)
        self.keys = slot_keys[:, :, : plan.kv_len]
        self.values = slot_values[:, :, : plan.kv_len]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._plan.kv_len, 0

    def get_seq_length(self) -> int:
        return self._plan.kv_len

    def get_max_length(self) -> int:
        return int(self._slot_keys.shape[2])


class StepCache(Cache):
    """The `Cache` handed to the HF model for one forward pass over contiguous slots."""

    def __init__(self, kv: SlotKVCache, plan: WritePlan) -> None:
        layers = [_SlotLayer(kv.keys[i], kv.values[i], plan) for i in range(kv.layout.num_layers)]
        super().__init__(layers=layers)  # type: ignore[arg-type]
