"""The paged KV pool and the `transformers.Cache` adapter that writes into it.

One pool per device: for every layer, keys and values of `num_blocks * block_size` positions,
`[positions, kv_heads, head_dim]`. Which block holds what is decided by the `BlockPool`
(pure Python); this module holds the tensors. A step writes each new token's K/V at its
physical position (`slot_mapping`, as vLLM calls it) and attention gathers each row's prefix
and own positions (see attention.py).

Blocks of 16 positions (vLLM's default): a row wastes under 16 positions at its end (about 5 %
of a 300-token row), while block tables stay short enough to build on the CPU every step.
"""

from dataclasses import dataclass
from functools import cached_property

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from server.engine.block_pool import BlockPool, PrefixBlocks

BLOCK_SIZE = 16


@dataclass(frozen=True)
class KVLayout:
    """Geometry of the pool. `num_slots` caps the rows running at once (`--max-batch-size`);
    memory is `num_blocks` blocks (default: room for `num_slots` rows of `max_len` positions,
    which is what the slot layout held)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_slots: int
    max_len: int
    dtype: torch.dtype
    device: torch.device
    num_blocks: int | None = None  # None: num_slots rows of max_len positions (+1 prefix each)
    block_size: int = BLOCK_SIZE

    @cached_property  # read per step by the stats: computed once (it allocates a tensor)
    def bytes_per_position(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_slot(self) -> int:
        """Bytes of one row of `max_len` positions (what the slot layout reserved per row)."""
        return self.bytes_per_position * self.max_len

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_position * self.block_size

    @property
    def total_blocks(self) -> int:
        """Blocks in the pool, the zero block included."""
        if self.num_blocks is not None:
            return self.num_blocks
        per_row = -(-self.max_len // self.block_size) + 1  # a prefix's partial block and the row's
        return self.num_slots * per_row + 1


class PagedKVCache:
    """The pool tensors of every layer and the block bookkeeping that places rows in them."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.pool = BlockPool(layout.total_blocks, layout.block_size)
        shape = (layout.total_blocks * layout.block_size, layout.num_kv_heads, layout.head_dim)
        # empty, not zeros: attention gathers only written positions, and padding reads block 0
        num, dtype, device = layout.num_layers, layout.dtype, layout.device
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num)]
        for tensor in self.keys + self.values:
            tensor[: layout.block_size].zero_()

    def positions(self, blocks: list[int], num_positions: int) -> torch.Tensor:
        """Physical positions `[num_positions]` of logical positions 0.. of a block table."""
        size = self.layout.block_size
        table = torch.tensor(blocks, dtype=torch.long)
        logical = torch.arange(num_positions)
        return table[logical // size] * size + logical % size

    def write_pending(self) -> None:
        """Copy prefixes the pool placed since the last call into their blocks."""
        pending, self.pool.pending = self.pool.pending, []
        for prefix, kv in pending:
            self.write_prefix(prefix, kv)

    def write_prefix(self, prefix: PrefixBlocks, kv: torch.Tensor) -> None:
        """Copy a prefix `[num_layers, 2, kv_heads, P, head_dim]` into its blocks: the pool is the
        device tier, so on a GPU this is the host -> device copy (from pinned memory)."""
        where = self.positions(prefix.blocks, prefix.num_positions).to(self.layout.device)
        kv = kv.to(self.layout.device, self.layout.dtype, non_blocking=True)
        for layer in range(self.layout.num_layers):
            self.keys[layer][where] = kv[layer, 0].transpose(0, 1)
            self.values[layer][where] = kv[layer, 1].transpose(0, 1)


SlotKVCache = PagedKVCache  # the name callers of the slot layout used


class _PagedLayer(CacheLayerMixin):
    """One layer's view of the pool for a single forward pass over a flat token sequence."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        super().__init__()
        self._pool_keys = keys
        self._pool_values = values
        self._slot_mapping = slot_mapping
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write token `t`'s K/V (`[1, kv_heads, tokens, head_dim]`) at its physical position;
        return the whole pool `[positions, kv_heads, head_dim]`: the attention function gathers."""
        self._pool_keys[self._slot_mapping] = key_states[0].transpose(0, 1).to(self._pool_keys.dtype)
        self._pool_values[self._slot_mapping] = value_states[0].transpose(0, 1).to(self._pool_values.dtype)
        return self._pool_keys, self._pool_values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return int(self._pool_keys.shape[0]), 0

    def get_seq_length(self) -> int:
        return 0  # positions come from explicit position_ids, never from the cache

    def get_max_length(self) -> int:
        return int(self._pool_keys.shape[0])


class StepCache(Cache):
    """The `Cache` handed to the HF model for one forward pass: token `t` of the step goes to
    physical position `slot_mapping[t]` of the pool."""

    def __init__(self, kv: PagedKVCache, slot_mapping: torch.Tensor) -> None:
        layers = [_PagedLayer(kv.keys[i], kv.values[i], slot_mapping) for i in range(kv.layout.num_layers)]
        super().__init__(layers=layers)  # type: ignore[arg-type]
