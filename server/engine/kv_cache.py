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


class _SlotLayer(CacheLayerMixin):
    """One layer's view of the slot tensors for a single forward pass over a flat token sequence."""

    is_sliding = False

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> None:
        super().__init__()
        self._slot_keys = keys
        self._slot_values = values
        self._slots = slots
        self._positions = positions
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write token `t`'s K/V (`[1, kv_heads, tokens, head_dim]`) at its row's slot and position;
        return every slot: the step's attention function reads each row's own part."""
        self._slot_keys[self._slots, :, self._positions] = (
            key_states[0].transpose(0, 1).to(self._slot_keys.dtype)
        )
        self._slot_values[self._slots, :, self._positions] = (
            value_states[0].transpose(0, 1).to(self._slot_values.dtype)
        )
        return self._slot_keys, self._slot_values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return int(self._slot_keys.shape[2]), 0

    def get_seq_length(self) -> int:
        return 0  # positions come from explicit position_ids, never from the cache

    def get_max_length(self) -> int:
        return int(self._slot_keys.shape[2])


class StepCache(Cache):
    """The `Cache` handed to the HF model for one forward pass: token `t` of the step belongs
    to slot `slots[t]` at position `positions[t]`."""

    def __init__(self, kv: SlotKVCache, slots: torch.Tensor, positions: torch.Tensor) -> None:
        layers = [_SlotLayer(kv.keys[i], kv.values[i], slots, positions) for i in range(kv.layout.num_layers)]
        super().__init__(layers=layers)  # type: ignore[arg-type]
