"""Block bookkeeping of the paged KV pool: pure Python (no torch), unit-tested exactly.

The pool is `num_blocks` blocks of `block_size` positions. Block 0 is never handed out: it
stays zero, and padded gathers read it (finite values under a mask).

A task's prefix lives in the pool once, read-only: `PrefixBlocks`, shared by every row of the
task and counted by references. A row owns only the blocks of its own tokens (its position
`j` after the prefix sits in block `j // block_size` of its table), so a prefix whose length
is not a multiple of the block size costs no per-row copy: its last block is simply partly
unused, once per prefix, and attention gathers exactly the prefix's positions.

Prefixes are told apart by identity of their source (the device tensor the prefix tier hands
out, held by weak reference: the pool never keeps a tensor alive). A task's new version (a new
source) marks the older resident ones stale: they are freed as soon as no row refers to them.
Unreferenced, current prefixes stay resident and are evicted LRU when rows need blocks.
"""

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.engine.request import Request


@dataclass(eq=False)
class PrefixBlocks:
    """One resident prefix: `num_positions` positions in `blocks`, used by `num_refs` rows."""

    task_id: str
    num_positions: int
    blocks: list[int]
    source: "weakref.ref[Any]"
    num_refs: int = 0
    is_stale: bool = False  # superseded by a newer source of its task: freed once unreferenced


@dataclass
class _Row:
    prefix: PrefixBlocks | None
    blocks: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class BlockStats:
    """Where the pool's blocks are (block 0, the zero block, is not counted)."""

    block_size: int
    num_blocks: int  # usable blocks
    num_prefix_blocks: int  # held by resident prefixes (referenced or not)
    num_idle_prefix_blocks: int  # of those, held by prefixes no row uses (evictable)
    num_row_blocks: int  # held by rows for their own tokens
    num_free_blocks: int
    num_resident_prefixes: int
    num_prefix_refs: int  # rows pointing at a resident prefix

    @classmethod
    def empty(cls) -> "BlockStats":
        """No pool (a stats record built without an engine)."""
        return cls(0, 0, 0, 0, 0, 0, 0, 0)

    @property
    def num_used_blocks(self) -> int:
        """Blocks that running rows need: their own and those of the prefixes they use."""
        return self.num_prefix_blocks - self.num_idle_prefix_blocks + self.num_row_blocks


class BlockPool:
    """Free list, reference-counted prefixes (LRU when unreferenced) and each row's block table."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a pool needs at least 2 blocks (one is the zero block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, 0, -1))  # a stack: low block ids first
        self._rows: dict[str, _Row] = {}
        self._by_task: dict[str, list[PrefixBlocks]] = {}
        self._idle: OrderedDict[int, PrefixBlocks] = OrderedDict()  # id -> unreferenced, oldest first
        self._num_idle_blocks = 0
        self.pending: list[tuple[PrefixBlocks, Any]] = []  # newly placed prefixes and their sources to write

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    @property
    def num_available(self) -> int:
        """Blocks that an allocation may take: free ones and those of unreferenced prefixes."""
        return len(self._free) + self._num_idle_blocks

    # ---- rows ----------------------------------------------------------------------------
    def admit(self, row_id: str, task_id: str, source: Any, prefix_len: int, num_positions: int) -> bool:
        """Give a new row its prefix (shared, placed if not resident) and blocks for its first
        `num_positions` own positions; all or nothing."""
        prefix = self._find(task_id, source) if prefix_len > 0 else None
        if prefix is None and prefix_len > 0:
            if self.blocks_for(prefix_len) + self.blocks_for(num_positions) > self.num_available:
                return False
            prefix = self._place(task_id, source, prefix_len)
        if prefix is not None:
            self._ref(prefix)
        self._rows[row_id] = _Row(prefix)
        if not self.grow(row_id, num_positions):
            self.free(row_id)
            return False
        return True

    def num_needed(self, row_id: str, num_positions: int) -> int:
        """New blocks the row needs to hold `num_positions` own positions."""
        return max(0, self.blocks_for(num_positions) - len(self._rows[row_id].blocks))

    def room(self, row_id: str) -> int:
        """Own positions the row could hold now (its blocks plus every available block)."""
        return (len(self._rows[row_id].blocks) + self.num_available) * self.block_size

    def grow(self, row_id: str, num_positions: int) -> bool:
        """Make the row's table cover `num_positions` own positions; False (unchanged) if it cannot."""
        row = self._rows[row_id]
        blocks = self._allocate(self.num_needed(row_id, num_positions))
        if blocks is None:
            return False
        row.blocks += blocks
        return True

    def free(self, row_id: str) -> None:
        """The row ended or was preempted: its blocks go back, its prefix loses a reference."""
        row = self._rows.pop(row_id, None)
        if row is None:
            return
        self._free += reversed(row.blocks)
        if row.prefix is not None:
            self._unref(row.prefix)

    def table(self, row_id: str) -> list[int]:
        return self._rows[row_id].blocks

    def prefix_of(self, row_id: str) -> PrefixBlocks | None:
        return self._rows[row_id].prefix

    def has_row(self, row_id: str) -> bool:
        return row_id in self._rows

    # ---- prefixes ------------------------------------------------------------------------
    def _find(self, task_id: str, source: Any) -> PrefixBlocks | None:
        return next((p for p in self._by_task.get(task_id, []) if p.source() is source), None)

    def _place(self, task_id: str, source: Any, prefix_len: int) -> PrefixBlocks:
        """A new resident prefix (the caller checked the room); older sources of the task go stale."""
        for old in list(self._by_task.get(task_id, [])):
            old.is_stale = True
            if old.num_refs == 0:
                self._drop(old)
        blocks = self._allocate(self.blocks_for(prefix_len))
        assert blocks is not None, "the caller checked num_available"
        prefix = PrefixBlocks(task_id, prefix_len, blocks, weakref.ref(source))
        self._by_task.setdefault(task_id, []).append(prefix)
        self._idle[id(prefix)] = prefix
        self._num_idle_blocks += len(blocks)
        self.pending.append((prefix, source))
        return prefix

    def _ref(self, prefix: PrefixBlocks) -> None:
        if prefix.num_refs == 0:
            del self._idle[id(prefix)]
            self._num_idle_blocks -= len(prefix.blocks)
        prefix.num_refs += 1

    def _unref(self, prefix: PrefixBlocks) -> None:
        prefix.num_refs -= 1
        if prefix.num_refs > 0:
            return
        if prefix.is_stale or prefix.source() is None:  # nobody can ask for it again
            self._drop(prefix, is_idle=False)
            return
        self._idle[id(prefix)] = prefix  # most recently used: evicted last
        self._num_idle_blocks += len(prefix.blocks)

    def _drop(self, prefix: PrefixBlocks, is_idle: bool = True) -> None:
        """Free an unreferenced prefix's blocks."""
        if is_idle:
            del self._idle[id(prefix)]
            self._num_idle_blocks -= len(prefix.blocks)
        self._free += reversed(prefix.blocks)
        prefix.blocks = []
        siblings = self._by_task[prefix.task_id]
        siblings.remove(prefix)
        if not siblings:
            del self._by_task[prefix.task_id]

    def evict_idle(self) -> int:
        """Free every unreferenced prefix; returns how many blocks came back."""
        num = self._num_idle_blocks
        while self._idle:
            self._drop(next(iter(self._idle.values())))
        return num

    def _allocate(self, num: int) -> list[int] | None:
        """`num` blocks from the free list, evicting unreferenced prefixes LRU when it runs short."""
        if num > self.num_available:
            return None
        while len(self._free) < num:
            self._drop(next(iter(self._idle.values())))
        taken = self._free[len(self._free) - num :]
        del self._free[len(self._free) - num :]
        return taken[::-1]

    def stats(self) -> BlockStats:
        prefixes = [p for group in self._by_task.values() for p in group]
        return BlockStats(
            block_size=self.block_size,
            num_blocks=self.num_blocks - 1,
            num_prefix_blocks=sum(len(p.blocks) for p in prefixes),
            num_idle_prefix_blocks=self._num_idle_blocks,
            num_row_blocks=sum(len(r.blocks) for r in self._rows.values()),
            num_free_blocks=len(self._free),
            num_resident_prefixes=len(prefixes),
            num_prefix_refs=sum(p.num_refs for p in prefixes),
        )


class RequestBlocks:
    """The scheduler's view of the pool (`BlockBudget`) for engine requests: a row's prefix is
    its task's resident prefix tensor; `num_tokens` counts its own tokens."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool

    @property
    def num_available(self) -> int:
        return self.pool.num_available

    def admit(self, request: "Request", num_tokens: int) -> bool:
        prefix, row_id = request.prefix, request.request_id
        return self.pool.admit(row_id, prefix.meta.task_id, prefix.kv, request.prefix_len, num_tokens)

    def grow(self, request: "Request", num_tokens: int) -> bool:
        return self.pool.grow(request.request_id, num_tokens)

    def num_needed(self, request: "Request", num_tokens: int) -> int:
        return self.pool.num_needed(request.request_id, num_tokens)

    def room(self, request: "Request") -> int:
        return self.pool.room(request.request_id)

    def free(self, request: "Request") -> None:
        self.pool.free(request.request_id)
