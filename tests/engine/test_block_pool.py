"""Block accounting of the paged pool, exactly: shared prefixes counted once, eviction LRU and
never of a referenced prefix, version replacement, and the pool all free at the end."""

from __future__ import annotations

import gc

import torch

from server.engine.block_pool import BlockPool, BlockStats


def _all_free(pool: BlockPool) -> bool:
    pool.evict_idle()
    stats = pool.stats()
    return stats.num_free_blocks == stats.num_blocks and stats.num_prefix_blocks == stats.num_row_blocks == 0


def test_64_rows_of_a_task_reference_one_copy_of_its_prefix() -> None:
    pool = BlockPool(num_blocks=1000, block_size=16)
    source = torch.empty(0)
    for i in range(64):
        assert pool.admit(f"r{i}", "acme:t", source, prefix_len=40, num_positions=20)
    assert [p for p, _ in pool.pending] == [pool.prefix_of("r0")]  # placed (written) once
    assert all(pool.prefix_of(f"r{i}") is pool.prefix_of("r0") for i in range(64))
    assert pool.stats() == BlockStats(
        block_size=16,
        num_blocks=999,
        num_prefix_blocks=3,  # 40 positions: 3 blocks, once
        num_idle_prefix_blocks=0,
        num_row_blocks=64 * 2,  # 20 own positions: 2 blocks per row
        num_free_blocks=999 - 3 - 128,
        num_resident_prefixes=1,
        num_prefix_refs=64,
    )
    for i in range(64):
        pool.free(f"r{i}")
    stats = pool.stats()
    assert (stats.num_prefix_blocks, stats.num_idle_prefix_blocks, stats.num_row_blocks) == (3, 3, 0)
    assert _all_free(pool)


def test_growth_takes_a_block_at_each_boundary() -> None:
    pool = BlockPool(num_blocks=10, block_size=4)
    assert pool.admit("r", "t", torch.empty(0), prefix_len=3, num_positions=4)
    assert len(pool.table("r")) == 1 and pool.num_needed("r", 5) == 1 and pool.num_needed("r", 4) == 0
    assert pool.grow("r", 5) and len(pool.table("r")) == 2
    assert pool.room("r") == (2 + pool.num_available) * 4
    pool.free("r")
    assert _all_free(pool)


def test_eviction_is_lru_and_never_frees_a_referenced_prefix() -> None:
    pool = BlockPool(num_blocks=11, block_size=4)  # 10 usable
    used, old, new = torch.empty(0), torch.empty(0), torch.empty(0)
    assert pool.admit("a", "used", used, prefix_len=8, num_positions=1)  # 2 + 1 blocks, referenced
    for task, source in (("old", old), ("new", new)):  # 2 blocks each, then unreferenced
        assert pool.admit(task, task, source, prefix_len=8, num_positions=1)
        pool.free(task)
    assert pool.stats().num_free_blocks == 3 and pool.num_available == 7
    assert pool.admit("b", "", None, prefix_len=0, num_positions=4 * 5)  # 5 blocks: evicts "old" only
    resident = {p.task_id for group in pool._by_task.values() for p in group}
    assert resident == {"used", "new"}
    assert not pool.admit("c", "", None, prefix_len=0, num_positions=4 * 3)  # 2 available: refused
    assert pool.stats().num_row_blocks == 1 + 5 and pool.prefix_of("a") is not None
    assert pool.prefix_of("a").blocks and pool.prefix_of("a").num_refs == 1  # type: ignore[union-attr]
    for row in ("a", "b"):
        pool.free(row)
    assert _all_free(pool)


def test_a_new_version_frees_the_old_prefix_after_its_last_row() -> None:
    pool = BlockPool(num_blocks=100, block_size=16)
    v1, v2 = torch.empty(0), torch.empty(0)
    assert pool.admit("old1", "t", v1, prefix_len=20, num_positions=5)
    assert pool.admit("old2", "t", v1, prefix_len=20, num_positions=5)
    assert pool.admit("new", "t", v2, prefix_len=33, num_positions=5)  # a new source of the task
    first, second = pool.prefix_of("old1"), pool.prefix_of("new")
    assert first is not None and second is not None and first is not second
    assert first.is_stale and not second.is_stale and pool.stats().num_prefix_blocks == 2 + 3
    pool.free("old1")
    assert pool.stats().num_prefix_blocks == 5  # still read by old2
    assert pool.admit("late", "t", v1, prefix_len=20, num_positions=5)  # an old request still shares it
    assert pool.prefix_of("late") is first
    pool.free("old2")
    pool.free("late")
    assert pool.stats().num_prefix_blocks == 3 and first.blocks == []  # freed at once, not left idle
    pool.free("new")
    assert pool.stats().num_idle_prefix_blocks == 3  # the current version stays resident (LRU)
    assert _all_free(pool)


def test_a_prefix_whose_source_is_gone_is_freed_when_its_last_row_ends() -> None:
    pool = BlockPool(num_blocks=20, block_size=16)
    source = torch.empty(0)
    assert pool.admit("r", "t", source, prefix_len=16, num_positions=1)
    pool.pending.clear()
    del source
    gc.collect()
    pool.free("r")
    assert pool.stats().num_prefix_blocks == 0 and pool.stats().num_free_blocks == 19


def test_a_failed_admission_changes_nothing() -> None:
    pool = BlockPool(num_blocks=5, block_size=4)
    before = pool.stats()
    assert not pool.admit("r", "t", torch.empty(0), prefix_len=8, num_positions=9)  # 2 + 3 > 4
    assert pool.stats() == before and not pool.has_row("r") and pool.pending == []
