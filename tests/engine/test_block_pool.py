"""Block accounting of the paged pool, exactly: shared prefixes counted once, eviction LRU and
never of a referenced prefix, residency by stored version (a reload hits, a new version
replaces, an old request's copy leaves the newer one alone), and the pool all free at the end."""

from __future__ import annotations

import torch

from prefix_store.entry import PrefixMeta
from server.engine.block_pool import BlockPool, BlockStats, ResidentBlocks


def _meta(task_id: str, version: int = 1, prefix_len: int = 8, created_at: str = "now") -> PrefixMeta:
    return PrefixMeta(task_id, version, prefix_len, 0, "float32", "fp", created_at)


def _all_free(pool: BlockPool) -> bool:
    pool.evict_idle()
    stats = pool.stats()
    return stats.num_free_blocks == stats.num_blocks and stats.num_prefix_blocks == stats.num_row_blocks == 0


def test_64_rows_of_a_task_reference_one_copy_of_its_prefix() -> None:
    pool = BlockPool(num_blocks=1000, block_size=16)
    key = _meta("acme:t", prefix_len=40)
    for i in range(64):
        assert pool.admit(f"r{i}", key, torch.empty(0), prefix_len=40, num_positions=20)
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
        num_idle_prefixes=0,
        num_prefix_hits=63,
        num_prefix_placements=1,
        resident=(ResidentBlocks("acme:t", 1, 40, 3, 64),),
    )
    assert pool.stats().rows_per_prefix == 64.0
    for i in range(64):
        pool.free(f"r{i}")
    stats = pool.stats()
    assert (stats.num_prefix_blocks, stats.num_idle_prefix_blocks, stats.num_row_blocks) == (3, 3, 0)
    assert (stats.num_idle_prefixes, stats.rows_per_prefix) == (1, 0.0)
    assert _all_free(pool)


def test_growth_takes_a_block_at_each_boundary() -> None:
    pool = BlockPool(num_blocks=10, block_size=4)
    assert pool.admit("r", _meta("t", prefix_len=3), torch.empty(0), prefix_len=3, num_positions=4)
    assert len(pool.table("r")) == 1 and pool.num_needed("r", 5) == 1 and pool.num_needed("r", 4) == 0
    assert pool.grow("r", 5) and len(pool.table("r")) == 2
    assert pool.room("r") == (2 + pool.num_available) * 4
    pool.free("r")
    assert _all_free(pool)


def test_eviction_is_lru_and_never_frees_a_referenced_prefix() -> None:
    pool = BlockPool(num_blocks=11, block_size=4)  # 10 usable
    assert pool.admit("a", _meta("used"), torch.empty(0), prefix_len=8, num_positions=1)  # 2 + 1, referenced
    for task in ("old", "new"):  # 2 blocks each, then unreferenced
        assert pool.admit(task, _meta(task), torch.empty(0), prefix_len=8, num_positions=1)
        pool.free(task)
    assert pool.stats().num_free_blocks == 3 and pool.num_available == 7
    assert [r.task_id for r in pool.stats().resident] == ["used", "old", "new"]
    assert pool.admit("b", None, None, prefix_len=0, num_positions=4 * 5)  # 5 blocks: evicts "old" only
    stats = pool.stats()
    assert {r.task_id for r in stats.resident} == {"used", "new"} and stats.num_prefix_evictions == 1
    assert not pool.admit("c", None, None, prefix_len=0, num_positions=4 * 3)  # 2 available: refused
    assert pool.stats().num_row_blocks == 1 + 5 and pool.prefix_of("a") is not None
    assert pool.prefix_of("a").blocks and pool.prefix_of("a").num_refs == 1  # type: ignore[union-attr]
    for row in ("a", "b"):
        pool.free(row)
    assert _all_free(pool)


def test_a_new_version_frees_the_old_prefix_after_its_last_row() -> None:
    pool = BlockPool(num_blocks=100, block_size=16)
    v1, v2 = _meta("t", 1, 20), _meta("t", 2, 33)
    assert pool.admit("old1", v1, torch.empty(0), prefix_len=20, num_positions=5)
    assert pool.admit("old2", v1, torch.empty(0), prefix_len=20, num_positions=5)
    assert pool.admit("new", v2, torch.empty(0), prefix_len=33, num_positions=5)  # the task's next version
    first, second = pool.prefix_of("old1"), pool.prefix_of("new")
    assert first is not None and second is not None and first is not second
    assert first.is_stale and not second.is_stale and pool.stats().num_prefix_blocks == 2 + 3
    pool.free("old1")
    assert pool.stats().num_prefix_blocks == 5  # still read by old2
    assert pool.admit("late", v1, torch.empty(0), prefix_len=20, num_positions=5)  # an old request shares it
    assert pool.prefix_of("late") is first
    pool.free("old2")
    pool.free("late")
    assert pool.stats().num_prefix_blocks == 3 and first.blocks == []  # freed at once, not left idle
    pool.free("new")
    assert pool.stats().num_idle_prefix_blocks == 3  # the current version stays resident (LRU)
    assert _all_free(pool)


def test_a_reload_of_the_same_version_hits_the_resident_blocks() -> None:
    """The host tier may drop a version and load it again: a new tensor, an equal `PrefixMeta`."""
    pool = BlockPool(num_blocks=20, block_size=16)
    assert pool.admit("r1", _meta("t", 3, 16), torch.zeros(1), prefix_len=16, num_positions=1)
    pool.free("r1")
    assert pool.admit("r2", _meta("t", 3, 16), torch.ones(1), prefix_len=16, num_positions=1)
    stats = pool.stats()
    assert (stats.num_prefix_placements, stats.num_prefix_hits, stats.num_resident_prefixes) == (1, 1, 1)
    assert len(pool.pending) == 1  # written once
    pool.free("r2")
    assert _all_free(pool)


def test_an_old_version_placed_again_leaves_the_newer_one_current() -> None:
    """A request that began on v1 is admitted after v2 was placed and v1's blocks were freed."""
    pool = BlockPool(num_blocks=20, block_size=16)
    v1, v2 = _meta("t", 1, 16), _meta("t", 2, 16)
    assert pool.admit("new", v2, torch.empty(0), prefix_len=16, num_positions=1)
    pool.free("new")
    assert pool.admit("old", v1, torch.empty(0), prefix_len=16, num_positions=1)
    old = pool.prefix_of("old")
    assert old is not None and old.is_stale and pool.stats().num_resident_prefixes == 2
    pool.free("old")  # stale: freed at once; v2 stays resident and hits
    assert [(r.version, r.num_refs) for r in pool.stats().resident] == [(2, 0)]
    assert pool.admit("next", v2, torch.empty(0), prefix_len=16, num_positions=1)
    assert pool.stats().num_prefix_hits == 1
    pool.free("next")
    assert _all_free(pool)


def test_versions_that_differ_only_in_their_metadata_are_different_prefixes() -> None:
    """Same task and version number but another upload (a Redis that was wiped): never shared."""
    pool = BlockPool(num_blocks=20, block_size=16)
    first, second = _meta("t", 1, 16, "2026-01-01"), _meta("t", 1, 16, "2026-02-01")
    assert pool.admit("a", first, torch.empty(0), prefix_len=16, num_positions=1)
    assert pool.admit("b", second, torch.empty(0), prefix_len=16, num_positions=1)
    assert pool.prefix_of("a") is not pool.prefix_of("b") and len(pool.pending) == 2
    for row in ("a", "b"):
        pool.free(row)
    assert _all_free(pool)


def test_a_failed_admission_changes_nothing() -> None:
    pool = BlockPool(num_blocks=5, block_size=4)
    before = pool.stats()
    assert not pool.admit("r", _meta("t"), torch.empty(0), prefix_len=8, num_positions=9)  # 2 + 3 > 4
    assert pool.stats() == before and not pool.has_row("r") and pool.pending == []
    assert pool.admit("r", _meta("t"), torch.empty(0), prefix_len=8, num_positions=1)
    pool.free("r")
    before = pool.stats()
    assert not pool.admit(
        "s", _meta("t"), torch.empty(0), prefix_len=8, num_positions=9
    )  # resident: 2 + 3 > 4
    assert pool.stats() == before and not pool.has_row("s")
