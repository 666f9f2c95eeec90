"""Block bookkeeping of the paged KV pool: pure Python (no torch), unit-tested exactly.

The pool is `num_blocks` blocks of `block_size` positions. Block 0 is never handed out: it
stays zero, and padded gathers read it (finite values under a mask).

A task's prefix lives in the pool once, read-only: `PrefixBlocks`, shared by every row of the
task and counted by references. A row owns only the blocks of its own tokens (its position
`j` after the prefix sits in block `j // block_size` of its table), so a prefix whose length
is not a multiple of the block size costs no per-row copy: its last block is simply partly
unused, once per prefix, and attention gathers exactly the prefix's positions.

The pool *is* the device tier of the prefix cache (one budget, one eviction policy): the
prefix store hands out host tensors, and a prefix is copied into blocks when a row first
needs it. Unreferenced prefixes stay resident and are evicted LRU when rows need blocks.

Prefixes are told apart by their `PrefixId`, the stored version's metadata (task, version,
creation time, ...), not by the identity of a tensor: the host tier may drop a version and
load it again from Redis, and that reload hits the resident blocks instead of placing a
second copy. Placing a newer version of a task marks the older resident ones stale: they are
freed as soon as no row refers to them. A request that still holds an older version (it began
before the upload) may place it again; that copy is stale from the start and leaves the newer
one alone. The pool never holds a tensor beyond the step that writes it (`pending`).
"""

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from server.engine.request import Request


class PrefixId(Hashable, Protocol):
    """What identifies one stored prefix version (a `PrefixMeta` is one): equal ids, equal contents."""

    @property
    def task_id(self) -> str: ...

    @property
    def version(self) -> int: ...


@dataclass(eq=False)
class PrefixBlocks:
    """One resident prefix: `num_positions` positions in `blocks`, used by `num_refs` rows."""

    key: PrefixId
    num_positions: int
    blocks: list[int]
    num_refs: int = 0
    is_stale: bool = False  # superseded by a newer version of its task: freed once unreferenced
    last_used: int = 0  # the pool's clock when a row last took or left it

    @property
    def task_id(self) -> str:
        return self.key.task_id


@dataclass(frozen=True)
class ResidentBlocks:
    """One resident prefix as the stats report it."""

    task_id: str
    version: int
    num_positions: int
    num_blocks: int
    num_refs: int  # rows reading it now (0: evictable)


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
    num_idle_prefixes: int = 0  # resident prefixes no row uses
    num_prefix_hits: int = 0  # admissions that found their prefix resident (since start)
    num_prefix_placements: int = 0  # admissions that copied their prefix into the pool
    num_prefix_evictions: int = 0  # unreferenced current prefixes freed for room (LRU)
    resident: tuple[ResidentBlocks, ...] = ()  # least recently used first

    @classmethod
    def empty(cls) -> "BlockStats":
        """No pool (a stats record built without an engine)."""
        return cls(0, 0, 0, 0, 0, 0, 0, 0)

    @property
    def num_used_blocks(self) -> int:
        """Blocks that running rows need: their own and those of the prefixes they use."""
        return self.num_prefix_blocks - self.num_idle_prefix_blocks + self.num_row_blocks

    @property
    def rows_per_prefix(self) -> float:
        """Rows reading each prefix that some row reads, on average (0.0 when none does)."""
        num_read = self.num_resident_prefixes - self.num_idle_prefixes
        return self.num_prefix_refs / num_read if num_read > 0 else 0.0


class BlockPool:
    """Free list, reference-counted prefixes (LRU when unreferenced) and each row's block table."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a pool needs at least 2 blocks (one is the zero block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, 0, -1))  # a stack: low block ids first
        self._rows: dict[str, _Row] = {}
        self._by_key: dict[PrefixId, PrefixBlocks] = {}
        self._by_task: dict[str, list[PrefixBlocks]] = {}
        self._idle: OrderedDict[int, PrefixBlocks] = OrderedDict()  # id -> unreferenced, oldest first
        self._num_idle_blocks = 0
        self._clock = 0
        self._num_hits = self._num_placements = self._num_evictions = 0
        self.pending: list[tuple[PrefixBlocks, Any]] = []  # newly placed prefixes and their sources to write

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    @property
    def num_available(self) -> int:
        """Blocks that an allocation may take: free ones and those of unreferenced prefixes."""
        return len(self._free) + self._num_idle_blocks

    # ---- rows ----------------------------------------------------------------------------
    def admit(
        self, row_id: str, key: PrefixId | None, source: Any, prefix_len: int, num_positions: int
    ) -> bool:
        """Give a new row its prefix `key` (shared; placed from `source` if not resident) and
        blocks for its first `num_positions` own positions; all or nothing."""
        prefix = self._by_key.get(key) if key is not None and prefix_len > 0 else None
        num_needed = self.blocks_for(num_positions)
        if prefix is None and key is not None and prefix_len > 0:
            num_needed += self.blocks_for(prefix_len)
        elif prefix is not None and prefix.num_refs == 0:
            num_needed += len(prefix.blocks)  # referenced, its blocks are no longer available
        if num_needed > self.num_available:
            return False
        if prefix is not None:
            self._num_hits += 1
        elif key is not None and prefix_len > 0:
            prefix = self._place(key, source, prefix_len)
        if prefix is not None:
            self._ref(prefix)
        self._rows[row_id] = _Row(prefix)
        is_grown = self.grow(row_id, num_positions)
        assert is_grown, "the room was checked above"
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
    def _place(self, key: PrefixId, source: Any, prefix_len: int) -> PrefixBlocks:
        """A new resident prefix (the caller checked the room). If it is its task's newest
        version, the older ones go stale; else it is stale itself (an old request's copy)."""
        siblings = self._by_task.get(key.task_id, [])
        is_newest = all(key.version >= old.key.version for old in siblings)
        if is_newest:
            for old in list(siblings):
                old.is_stale = True
                if old.num_refs == 0:
                    self._drop(old)
        blocks = self._allocate(self.blocks_for(prefix_len))
        assert blocks is not None, "the caller checked num_available"
        prefix = PrefixBlocks(key, prefix_len, blocks, is_stale=not is_newest)
        self._by_key[key] = prefix
        self._by_task.setdefault(key.task_id, []).append(prefix)
        self._idle[id(prefix)] = prefix
        self._num_idle_blocks += len(blocks)
        self._num_placements += 1
        self.pending.append((prefix, source))
        return prefix

    def _ref(self, prefix: PrefixBlocks) -> None:
        if prefix.num_refs == 0:
            del self._idle[id(prefix)]
            self._num_idle_blocks -= len(prefix.blocks)
        prefix.num_refs += 1
        self._touch(prefix)

    def _unref(self, prefix: PrefixBlocks) -> None:
        prefix.num_refs -= 1
        self._touch(prefix)
        if prefix.num_refs > 0:
            return
        if prefix.is_stale:  # nobody asks for it again
            self._drop(prefix, is_idle=False)
            return
        self._idle[id(prefix)] = prefix  # most recently used: evicted last
        self._num_idle_blocks += len(prefix.blocks)

    def _touch(self, prefix: PrefixBlocks) -> None:
        self._clock += 1
        prefix.last_used = self._clock

    def _drop(self, prefix: PrefixBlocks, is_idle: bool = True) -> None:
        """Free an unreferenced prefix's blocks."""
        if is_idle:
            del self._idle[id(prefix)]
            self._num_idle_blocks -= len(prefix.blocks)
        self._free += reversed(prefix.blocks)
        prefix.blocks = []
        del self._by_key[prefix.key]
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
            self._num_evictions += 1
        taken = self._free[len(self._free) - num :]
        del self._free[len(self._free) - num :]
        return taken[::-1]

    def stats(self) -> BlockStats:
        prefixes = sorted(self._by_key.values(), key=lambda p: p.last_used)
        return BlockStats(
            block_size=self.block_size,
            num_blocks=self.num_blocks - 1,
            num_prefix_blocks=sum(len(p.blocks) for p in prefixes),
            num_idle_prefix_blocks=self._num_idle_blocks,
            num_row_blocks=sum(len(r.blocks) for r in self._rows.values()),
            num_free_blocks=len(self._free),
            num_resident_prefixes=len(prefixes),
            num_prefix_refs=sum(p.num_refs for p in prefixes),
            num_idle_prefixes=len(self._idle),
            num_prefix_hits=self._num_hits,
            num_prefix_placements=self._num_placements,
            num_prefix_evictions=self._num_evictions,
            resident=tuple(
                ResidentBlocks(p.task_id, p.key.version, p.num_positions, len(p.blocks), p.num_refs)
                for p in prefixes
            ),
        )


class RequestBlocks:
    """The scheduler's view of the pool (`BlockBudget`) for engine requests: a row's prefix is
    its task's stored version (`PrefixMeta`), copied from the host tensor the request holds;
    `num_tokens` counts its own tokens."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool

    @property
    def num_available(self) -> int:
        return self.pool.num_available

    def admit(self, request: "Request", num_tokens: int) -> bool:
        prefix, row_id = request.prefix, request.request_id
        return self.pool.admit(row_id, prefix.meta, prefix.kv, request.prefix_len, num_tokens)

    def grow(self, request: "Request", num_tokens: int) -> bool:
        return self.pool.grow(request.request_id, num_tokens)

    def num_needed(self, request: "Request", num_tokens: int) -> int:
        return self.pool.num_needed(request.request_id, num_tokens)

    def room(self, request: "Request") -> int:
        return self.pool.room(request.request_id)

    def free(self, request: "Request") -> None:
        self.pool.free(request.request_id)
