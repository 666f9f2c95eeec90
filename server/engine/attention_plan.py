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
class PrefixGroup:
    """The step's queries of every row of one prefix, and the prefix's physical positions."""

    tokens: torch.Tensor  # [T] step indices
    positions: torch.Tensor  # [P]


@dataclass(frozen=True)
class OwnChunk:
    """A row feeding `length` tokens (tokens `offset..` of the step) attends to its keys by itself."""

    offset: int
    length: int
    positions: torch.Tensor  # [L] physical positions: its prefix's unless grouped, then its own
    mask: torch.Tensor  # [length, L] causal: the chunk's last query sees all L


@dataclass(frozen=True)
class StepAttention:
    """Where each token of the step sits and what each row reads."""

    slot_mapping: torch.Tensor  # [tokens] physical position each new token's K/V is written to
    token_positions: torch.Tensor  # [tokens] logical positions (the model's position ids)
    single_tokens: torch.Tensor  # [n1] step indices of the one-token rows
    single_positions: torch.Tensor  # [n1, L] keys each reads by itself (see OwnChunk; padding: 0)
    single_mask: torch.Tensor  # [n1, L] which of those are real
    chunks: list[OwnChunk]
    groups: list[PrefixGroup]


def _positions(tables: list[list[int]], lengths: list[int], block_size: int) -> torch.Tensor:
    """Physical positions `[rows, width]` of logical positions `0..length-1` of each block table
    (beyond a row's length: 0, in the zero block)."""
    width = max(max(lengths, default=0), 1)
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
    chunks = []
    for i, row in enumerate(rows):
        if row.num_tokens > 1:
            end = int(valid[i].sum())
            mask = torch.arange(end)[None, :] <= torch.arange(end - row.num_tokens, end)[:, None]
            chunks.append(
                OwnChunk(int(offsets[i]), row.num_tokens, keys[i, :end].to(device), mask.to(device))
            )
    return StepAttention(
        slot_mapping=own[row_of, own_index].to(device),
        token_positions=(prefix_lens[row_of] + own_index).to(device),
        single_tokens=offsets[singles].to(device),
        single_positions=keys[singles, :width].to(device),
        single_mask=valid[singles, :width].to(device),
        chunks=chunks,
        groups=_groups(
            [r if g else None for r, g in zip(rows, grouped, strict=True)],
            offsets,
            counts,
            block_size,
            device,
        ),
    )


def _groups(
    rows: list[PlanRow | None],
    offsets: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    device: torch.device,
) -> list[PrefixGroup]:
    """One group per grouped prefix of the step (rows not grouped: None), in order of first appearance."""
    members: dict[int, list[int]] = {}
    prefixes: dict[int, PrefixBlocks] = {}
    for i, row in enumerate(rows):
        if row is not None and row.prefix is not None:
            members.setdefault(id(row.prefix), []).append(i)
            prefixes[id(row.prefix)] = row.prefix
    groups = []
    for key, indices in members.items():
        prefix = prefixes[key]
        tokens = torch.cat([torch.arange(int(offsets[i]), int(offsets[i] + counts[i])) for i in indices])
        positions = _positions([prefix.blocks], [prefix.num_positions], block_size)[0]
        groups.append(PrefixGroup(tokens.to(device), positions.to(device)))
    return groups
