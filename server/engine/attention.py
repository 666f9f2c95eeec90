"""Exact per-row attention for a mixed step, plugged into transformers as an attention function.

A mixed step runs every token of the step as one sequence `[1, tokens]`, so the linear layers
see all of them at once. Attention must still stay per row (its own prefix, its own past, causal
within its chunk), and a dense mask over all tokens and all rows would waste work in proportion
to the number of rows. So, per layer:
- rows feeding one token (decode rows, one-token prompts) attend together: one batched call over
  a *view* of slots `0..n-1` with a `[n, 1, 1, kv_len]` length mask;
- each row feeding a chunk attends alone over its own slot with a causal mask offset by its start.
Both read the slot tensors the `StepCache` just wrote (keys/values of every slot).
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "prefix_slots"


@dataclass(frozen=True)
class ChunkRow:
    """A row feeding `length` tokens (tokens `offset..offset+length-1` of the step) at `start`."""

    slot: int
    offset: int
    start: int  # cache position of its first new token
    mask: torch.Tensor  # [length, start + length] causal, offset by `start`


@dataclass(frozen=True)
class StepAttention:
    """Where each token of the step sits, prepared once per step and read by every layer."""

    token_slots: torch.Tensor  # [tokens] the slot of each token
    token_positions: torch.Tensor  # [tokens] its cache position
    single_tokens: torch.Tensor  # [n1] step indices of the one-token rows
    single_slots: list[int]  # their slots
    single_view: int  # slots 0..single_view-1 are read for them
    single_query_rows: torch.Tensor | None  # [n1] row of the view for each (None: 0..n1-1)
    single_mask: torch.Tensor  # [single_view, 1, 1, single_kv_len]
    chunks: list[ChunkRow]


def prepare(rows: list[tuple[int, int, int]], device: torch.device) -> StepAttention:
    """Plan attention for rows `(slot, start position, num_tokens)` in token order."""
    slots: list[int] = []
    positions: list[int] = []
    singles: list[int] = []
    single_slots: list[int] = []
    single_lens: list[int] = []
    chunks: list[ChunkRow] = []
    offset = 0
    for slot, start, length in rows:
        slots += [slot] * length
        positions += range(start, start + length)
        if length == 1:
            singles.append(offset)
            single_slots.append(slot)
            single_lens.append(start + 1)
        else:
            keys = torch.arange(start + length)
            mask = keys[None, :] <= torch.arange(start, start + length)[:, None]
            chunks.append(ChunkRow(slot, offset, start, mask.to(device)))
        offset += length
    view = max(single_slots, default=-1) + 1
    lens = torch.ones(view, dtype=torch.long)  # rows of the view that do not query: see position 0
    if single_slots:
        lens[torch.tensor(single_slots)] = torch.tensor(single_lens)
    kv_len = int(lens.max()) if view else 0
    mask = torch.arange(kv_len)[None, :] < lens[:, None]
    contiguous = single_slots == list(range(len(single_slots)))
    return StepAttention(
        token_slots=torch.tensor(slots, dtype=torch.long, device=device),
        token_positions=torch.tensor(positions, dtype=torch.long, device=device),
        single_tokens=torch.tensor(singles, dtype=torch.long, device=device),
        single_slots=single_slots,
        single_view=view,
        single_query_rows=None if contiguous else torch.tensor(single_slots, dtype=torch.long, device=device),
        single_mask=mask[:, None, None, :].to(device),
        chunks=chunks,
    )


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    step_attention: StepAttention | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`query` `[1, heads, tokens, d]`; `key`/`value`: every slot `[slots, kv_heads, max_len, d]`.

    Returns `[1, tokens, heads, d]` as transformers' attention functions do. Without a step plan
    (any other use of the model, e.g. encoding a text prefix) it is plain SDPA.
    """
    if step_attention is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    plan = step_attention
    gqa = query.shape[1] != key.shape[1]
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [tokens, heads, d]
    if plan.single_slots:
        q = query[0, :, plan.single_tokens].transpose(0, 1)[:, :, None]  # [n1, heads, 1, d]
        if plan.single_query_rows is not None:  # some rows of the view do not query: give them zeros
            q = q.new_zeros(plan.single_view, *q.shape[1:]).index_copy_(0, plan.single_query_rows, q)
        kv_len = plan.single_mask.shape[-1]
        o = scaled_dot_product_attention(
            q,
            key[: plan.single_view, :, :kv_len],
            value[: plan.single_view, :, :kv_len],
            attn_mask=plan.single_mask,
            scale=scaling,
            enable_gqa=gqa,
        )  # [view, heads, 1, d]
        if plan.single_query_rows is not None:
            o = o[plan.single_query_rows]
        out[plan.single_tokens] = o[:, :, 0]
    for chunk in plan.chunks:
        length, end = chunk.mask.shape[0], chunk.mask.shape[1]
        o = scaled_dot_product_attention(
            query[:, :, chunk.offset : chunk.offset + length],
            key[chunk.slot : chunk.slot + 1, :, :end],
            value[chunk.slot : chunk.slot + 1, :, :end],
            attn_mask=chunk.mask,
            scale=scaling,
            enable_gqa=gqa,
        )  # [1, heads, length, d]
        out[chunk.offset : chunk.offset + length] = o[0].transpose(0, 1)
    return out[None], None


AttentionInterface.register(NAME, slot_attention)
