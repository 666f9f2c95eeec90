"""Grouped prefix attention over the paged pool equals a per-row reference (plain SDPA over the
row's prefix and own keys, causal within its chunk) on random shapes: GQA, odd prefix lengths,
prefixes shorter and longer than a block, rows of one task mixed with rows of others, decode
rows mixed with chunked prefills."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from prefix_store.entry import PrefixMeta
from server.engine.attention import attend, merge, step_attention_forward
from server.engine.attention_plan import PlanRow, prepare
from server.engine.block_pool import BlockPool

BLOCK = 16


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """`q` `[n, heads, d]` at key positions `start..start+n-1` of `k`/`v` `[L, kv_heads, d]`."""
    n, length = q.shape[0], k.shape[0]
    mask = torch.arange(length)[None, :] <= torch.arange(start, start + n)[:, None]
    out = scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("min_group_rows", [1, 3, 100])  # every prefix grouped, some, none
def test_grouped_attention_equals_per_row_reference(
    seed: int, heads: int, kv_heads: int, min_group_rows: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    d, scale = 8, 8**-0.5
    pool = BlockPool(num_blocks=128, block_size=BLOCK)
    keys = torch.randn(128 * BLOCK, kv_heads, d, generator=gen)
    values = torch.randn(128 * BLOCK, kv_heads, d, generator=gen)
    prefix_lens = [1, 7, 16, 23, 40]  # shorter than, equal to and longer than a block
    sources = [torch.empty(0) for _ in prefix_lens]
    rows, shapes = [], []
    for i in range(12):
        task = int(torch.randint(len(prefix_lens) + 1, (1,), generator=gen))  # the last: no prefix
        own_start = int(torch.randint(0, 40, (1,), generator=gen))
        num_tokens = 1 if i % 3 else int(torch.randint(2, 20, (1,), generator=gen))  # decode and chunks
        plen = prefix_lens[task] if task < len(prefix_lens) else 0
        source = sources[task] if task < len(prefix_lens) else None
        key = PrefixMeta(f"t{task}", 1, plen, 0, "float32", "fp", "now") if plen else None
        assert pool.admit(f"r{i}", key, source, plen, own_start + num_tokens)
        rows.append(PlanRow(pool.prefix_of(f"r{i}"), pool.table(f"r{i}"), own_start, num_tokens))
        shapes.append((plen, own_start, num_tokens))
    pool.pending.clear()
    plan = prepare(rows, BLOCK, torch.device("cpu"), min_group_rows)
    num_tokens = sum(n for _, _, n in shapes)
    q = torch.randn(num_tokens, heads, d, generator=gen)
    out = step_attention_forward(plan, q, keys, values, scale)
    offset = 0
    for row, (plen, own_start, n) in zip(rows, shapes, strict=True):
        where = torch.cat([_prefix_positions(row), _own_positions(row)])  # what the row attends to
        expected = _reference(q[offset : offset + n], keys[where], values[where], plen + own_start, scale)
        torch.testing.assert_close(out[offset : offset + n], expected, atol=2e-6, rtol=1e-5)
        offset += n
    readers = Counter(id(r.prefix) for r in rows if r.prefix is not None)
    assert plan.group_tokens.shape[0] == sum(n >= min_group_rows for n in readers.values())


def _own_positions(row: PlanRow) -> torch.Tensor:
    logical = torch.arange(row.own_start + row.num_tokens)
    return torch.tensor(row.blocks)[logical // BLOCK] * BLOCK + logical % BLOCK


def _prefix_positions(row: PlanRow) -> torch.Tensor:
    if row.prefix is None:
        return torch.empty(0, dtype=torch.long)
    logical = torch.arange(row.prefix.num_positions)
    return torch.tensor(row.prefix.blocks)[logical // BLOCK] * BLOCK + logical % BLOCK


def test_the_log_sum_exp_merge_of_two_parts_equals_attention_over_both() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 5, 8, generator=gen) for _ in range(3))
    whole, lse = attend(q, k, v, 0.3)
    a, lse_a = attend(q, k[:, :2], v[:, :2], 0.3)
    b, lse_b = attend(q, k[:, 2:], v[:, 2:], 0.3)
    merged, merged_lse = merge(a, lse_a, b, lse_b)
    torch.testing.assert_close(merged, whole)
    torch.testing.assert_close(merged_lse, lse)
    torch.testing.assert_close(whole, scaled_dot_product_attention(q, k, v, scale=0.3))
