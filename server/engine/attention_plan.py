"""The per-step attention plan over the paged pool: where each new token's K/V goes, which
physical positions each row reads, and which rows share a prefix. Built once a step on the
CPU (a few tensor ops over all rows, no per-position Python), read by every layer."""

from collections import Counter
from dataclasses import dataclass

import torch

from server.engine.block_pool import PrefixBlocks

# a prefix read by fewer rows in a step is read per row: the merge's fixed cost (a dozen small
# operations per layer) outweighs reading a short prefix two or three times
MIN_GROUP_ROWS = 4


@dataclass(frozen=True)
class PlanRow:
    """One row of a step: `num_tokens` new tokens after `own_start` own positions already cached."""

    prefix: PrefixBlocks | None  # its shared prefix (None: no prefix)
    blocks: list[int]  # its own block table, covering own_start + num_tokens positions
    own_start: int
    num_tokens: int

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.num_positions


@dataclass(frozen=True)
class StepAttention:
    """Where each token of the step sits and what each row reads."""

    slot_mapping: torch.Tensor  # [tokens] physical position each new token's K/V is written to
    token_positions: torch.Tensor  # [tokens] logical positions (the model's position ids)
    single_tokens: torch.Tensor  # [n1] step indices of the one-token rows
    # keys a row reads by itself: its own positions, after its prefix's unless its group reads those
    single_positions: torch.Tensor  # [n1, L] (padding: position 0, in the zero block)
    single_mask: torch.Tensor  # [n1, L] which of those are real
    # rows feeding several tokens, padded to [chunks, Lq] queries and [chunks, Lk] keys
    chunk_tokens: torch.Tensor  # [nc, Lq] step index of each query (padding: 0)
    chunk_queries: torch.Tensor  # [nc, Lq] which queries are real
    chunk_positions: torch.Tensor  # [nc, Lk] keys each reads by itself (padding: 0)
    chunk_mask: torch.Tensor  # [nc, Lq, Lk] causal; a padding query sees key 0 (stays finite)
    # prefixes read by a group of rows, padded: [groups, T] queries against [groups, P] keys
    group_tokens: torch.Tensor  # [ng, T] step index of each query of the group's rows (padding: 0)
    group_queries: torch.Tensor  # [ng, T] which are real
    group_positions: torch.Tensor  # [ng, P] the prefix's physical positions (padding: 0)
    group_mask: torch.Tensor  # [ng, P] which are real

    @property
    def has_groups(self) -> bool:
        return self.group_tokens.shape[0] > 0


def _positions(tables: list[list[int]], lengths: list[int], block_size: int) -> torch.Tensor:
    """Physical positions `[rows, width]` of logical positions `0..length-1` of each block table
    (beyond a row's length: 0, in the zero block)."""
    width = max(max(lengths, default=0), 1)
    if not tables:
        return torch.zeros(0, width, dtype=torch.long)
    num_blocks = -(-width // block_size)
    table = torch.tensor([t[:num_blocks] + [0] * (num_blocks - len(t[:num_blocks])) for t in tables])
    logical = torch.arange(width)
    physical = table[:, logical // block_size] * block_size + logical % block_size
    return torch.where(logical[None, :] < torch.tensor(lengths)[:, None], physical, 0)


def _keys(
    rows: list[PlanRow], grouped: list[bool], own: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What each row attends to by itself `[rows, width]` and which entries are real: its own
    positions, after its prefix's unless the prefix is attended to by its group."""
    leads = [0 if is_grouped else r.prefix_len for r, is_grouped in zip(rows, grouped, strict=True)]
    prefix = _positions([r.prefix.blocks if r.prefix is not None else [] for r in rows], leads, block_size)
    lead = torch.tensor(leads)[:, None]
    ends = lead + torch.tensor([r.own_start + r.num_tokens for r in rows])[:, None]
    logical = torch.arange(int(ends.max()))[None, :]
    from_prefix = prefix.gather(1, logical.clamp(max=prefix.shape[1] - 1).expand(len(rows), -1))
    from_own = own.gather(1, (logical - lead).clamp(0, own.shape[1] - 1))
    valid = logical < ends
    return torch.where(valid, torch.where(logical < lead, from_prefix, from_own), 0), valid


def prepare(
    rows: list[PlanRow], block_size: int, device: torch.device, min_group_rows: int = MIN_GROUP_ROWS
) -> StepAttention:
    """Plan attention for `rows` in token order; prefixes read by at least `min_group_rows` rows
    of the step are attended to by the group at once."""
    readers = Counter(id(r.prefix) for r in rows if r.prefix is not None)
    grouped = [r.prefix is not None and readers[id(r.prefix)] >= min_group_rows for r in rows]
    own = _positions([r.blocks for r in rows], [r.own_start + r.num_tokens for r in rows], block_size)
    keys, valid = _keys(rows, grouped, own, block_size)
    counts = torch.tensor([r.num_tokens for r in rows])
    offsets = counts.cumsum(0) - counts  # first step index of each row
    row_of = torch.repeat_interleave(torch.arange(len(rows)), counts)  # [tokens]
    starts = torch.tensor([r.own_start for r in rows])
    own_index = torch.arange(int(counts.sum())) - offsets[row_of] + starts[row_of]  # [tokens]
    prefix_lens = torch.tensor([r.prefix_len for r in rows])
    singles = [i for i, r in enumerate(rows) if r.num_tokens == 1]
    width = int(valid[singles].sum(1).max()) if singles else 0
    chunk_rows = [i for i, r in enumerate(rows) if r.num_tokens > 1]
    chunks = _chunks(chunk_rows, counts, offsets, keys, valid)
    return StepAttention(
        slot_mapping=own[row_of, own_index].to(device),
        token_positions=(prefix_lens[row_of] + own_index).to(device),
        single_tokens=offsets[singles].to(device),
        single_positions=keys[singles, :width].to(device),
        single_mask=valid[singles, :width].to(device),
        chunk_tokens=chunks[0].to(device),
        chunk_queries=chunks[1].to(device),
        chunk_positions=chunks[2].to(device),
        chunk_mask=chunks[3].to(device),
        **_groups(
            [r if g else None for r, g in zip(rows, grouped, strict=True)],
            offsets,
            counts,
            block_size,
            device,
        ),
    )


def _chunks(
    rows: list[int], counts: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk rows' queries and keys, padded: see `StepAttention.chunk_*`."""
    num_queries, num_keys = counts[rows], valid[rows].sum(1)  # [nc]
    width_q = int(num_queries.max()) if rows else 0
    width_k = int(num_keys.max()) if rows else 0
    q_index, k_index = torch.arange(width_q), torch.arange(width_k)
    queries = q_index[None, :] < num_queries[:, None]  # [nc, Lq]
    tokens = torch.where(queries, offsets[rows][:, None] + q_index[None, :], 0)
    first = (num_keys - num_queries)[:, None, None]  # key index of each chunk's first query
    mask = (k_index[None, None, :] <= first + q_index[None, :, None]) & queries[:, :, None]
    if rows:
        mask[:, :, 0] |= ~queries
    return tokens, queries, keys[rows, :width_k], mask


def _groups(
    rows: list[PlanRow | None],
    offsets: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The `group_*` fields: one group per grouped prefix (rows not grouped: None)."""
    members: dict[int, list[int]] = {}
    prefixes: dict[int, PrefixBlocks] = {}
    for i, row in enumerate(rows):
        if row is not None and row.prefix is not None:
            members.setdefault(id(row.prefix), []).append(i)
            prefixes[id(row.prefix)] = row.prefix
    tokens = [
        torch.cat([torch.arange(int(offsets[i]), int(offsets[i] + counts[i])) for i in m])
        for m in members.values()
    ]
    lengths = [p.num_positions for p in prefixes.values()]
    positions = _positions([p.blocks for p in prefixes.values()], lengths, block_size)
    width = max((len(t) for t in tokens), default=0)
    padded = torch.zeros(len(tokens), width, dtype=torch.long)
    for g, t in enumerate(tokens):
        padded[g, : len(t)] = t
    queries = torch.arange(width)[None, :] < torch.tensor([len(t) for t in tokens], dtype=torch.long)[:, None]
    mask = torch.arange(positions.shape[1])[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]
    return {
        "group_tokens": padded.to(device),
        "group_queries": queries.to(device),
        "group_positions": positions.to(device),
        "group_mask": mask.to(device),
    }
