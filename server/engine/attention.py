"""Exact attention over the paged pool for a mixed step, plugged into transformers as an
attention function; a shared prefix is read once per step for all the rows of its task.

A mixed step runs every token of the step as one sequence `[1, tokens]`, so the linear layers
see all of them at once. Attention stays per row, in two parts merged exactly by log-sum-exp
(Hydragen, arXiv 2402.05099; FlashInfer's cascade attention):
- prefix part, for a prefix read by several rows of the step (attention_plan.MIN_GROUP_ROWS):
  the queries of all its rows (decode tokens and prefill chunks alike; no mask, every query
  sees the whole prefix) against its K/V as one matrix product per KV head, the query heads that
  share a KV head folded into the query dimension; all such groups in one padded batch;
- what each row reads by itself: its own tokens (and its prefix, when that is not read by a
  group): one-token rows in one padded batch with a length mask, chunk rows in another with a
  causal mask. A step without a group needs no merge.
Pure PyTorch: the same code on CPU and CUDA. The plan (`StepAttention`) is built once a step
(attention_plan.py) and read by every layer."""

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine.attention_plan import StepAttention

NAME = "prefix_paged"


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    blocked: torch.Tensor | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention returning float32 `(out [..., M, d], lse [..., M])`.

    `q` `[..., M, d]`, `k`/`v` `[..., N, d]`, `blocked` (True: masked out) broadcastable to
    `[..., M, N]` (the negated mask: a caller negates it once for all heads). Plain matrix
    products, not SDPA: PyTorch's fused CPU kernel costs far more at these small, many-batch
    shapes (it threads over the batch). Without `need_lse`, lse is None and the probabilities
    are one fused softmax; with it, one exponential serves both (not logsumexp, then exp again)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)  # [..., M, N]
    if blocked is not None:
        scores.masked_fill_(blocked, float("-inf"))
    if not need_lse:
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v).float(), None
    peak = scores.amax(dim=-1, keepdim=True)
    total = scores.sub_(peak).exp_().sum(dim=-1, keepdim=True)
    probs = scores.div_(total)
    return torch.matmul(probs.to(v.dtype), v).float(), (peak + total.log()).squeeze(-1)


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys `A ∪ B` from attention over each: `out [..., d]`, `lse [...]`."""
    lse = torch.logaddexp(lse_a, lse_b)
    return torch.exp(lse_a - lse)[..., None] * out_a + torch.exp(lse_b - lse)[..., None] * out_b, lse


def attend_per_kv_head(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    where: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attend` for `q` `[B, kv_heads, M, d]` against the pool positions `where` `[B * N]` of
    `key`/`value` (`[positions, kv_heads, d]`), one KV head at a time: gather that head's keys
    (`[B, N, d]`, contiguous) and multiply while they are still in cache. Gathering every head at
    once and permuting to `[B, kv_heads, N, d]` made the product copy all keys again, and the
    gathered keys of all heads outgrow the cache (together two thirds of a 64-row CPU decode step
    at GPT-2 small). `mask` (True: attend) broadcastable to `[B, 1, M, N]`, the same for every
    head. Returns float32 `out [B, kv_heads, M, d]`, `lse [B, kv_heads, M]` (None without `need_lse`)."""
    batch, kv_heads, m, d = q.shape
    out = q.new_empty(batch, kv_heads, m, d, dtype=torch.float32)
    lse = q.new_empty(batch, kv_heads, m, dtype=torch.float32) if need_lse else None
    blocked = None if mask is None else ~mask[:, 0]  # negated once for every head
    for h in range(kv_heads):
        k = key[:, h].index_select(0, where).view(batch, -1, d)
        v = value[:, h].index_select(0, where).view(batch, -1, d)
        out[:, h], head_lse = attend(q[:, h], k, v, scale, blocked, need_lse)
        if lse is not None and head_lse is not None:
            lse[:, h] = head_lse
    return out, lse


def _own_singles(
    plan: StepAttention, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One-token rows against the keys each reads by itself: `[n1, heads, d]`, `[n1, heads]`."""
    n1, heads, d = q.shape
    kv_heads = key.shape[1]
    qs = q.view(n1, kv_heads, heads // kv_heads, d)  # [n1, kv_heads, rep, d]
    where = plan.single_positions.reshape(-1)  # a flat index_select: far cheaper than a 2-D gather
    out, lse = attend_per_kv_head(qs, key, value, where, scale, plan.single_mask[:, None, None, :], need_lse)
    return out.reshape(n1, heads, d), None if lse is None else lse.reshape(n1, heads)


def _own_chunks(
    plan: StepAttention, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every chunk row's queries against the keys it reads by itself, padded into one batch;
    returns `[real queries, heads, d]`, `[real queries, heads]` in `chunk_tokens` order."""
    nc, width_q = plan.chunk_tokens.shape
    heads, d = q.shape[1], q.shape[2]
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    qc = q[plan.chunk_tokens.reshape(-1)].view(nc, width_q, kv_heads, rep, d)
    qc = qc.permute(0, 2, 3, 1, 4).reshape(nc, kv_heads, rep * width_q, d)  # [nc, kv_heads, rep * Lq, d]
    mask = plan.chunk_mask.repeat(1, rep, 1)[:, None]  # [nc, 1, rep * Lq, Lk]
    out, lse = attend_per_kv_head(qc, key, value, plan.chunk_positions.reshape(-1), scale, mask, need_lse)
    real = plan.chunk_queries.reshape(-1)
    out = out.view(nc, kv_heads, rep, width_q, d).permute(0, 3, 1, 2, 4).reshape(nc * width_q, heads, d)
    if lse is not None:
        lse = lse.view(nc, kv_heads, rep, width_q).permute(0, 3, 1, 2).reshape(nc * width_q, heads)[real]
    return out[real], lse


def _grouped_prefixes(
    plan: StepAttention, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's queries against its prefix, all groups in one batched product (GQA folded:
    `[groups, kv_heads, T * rep, d]` against its `P` keys, a product per KV head); returns
    `[real queries, heads, d]`, `[real queries, heads]` in `group_tokens` order."""
    ng, width_t = plan.group_tokens.shape
    heads, d = q.shape[1], q.shape[2]
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    qg = q[plan.group_tokens.reshape(-1)].view(ng, width_t, kv_heads, rep, d)
    qg = qg.transpose(1, 2).reshape(ng, kv_heads, width_t * rep, d)
    where = plan.group_positions.reshape(-1)
    out, lse = attend_per_kv_head(qg, key, value, where, scale, plan.group_mask[:, None, None, :])
    assert lse is not None
    real = plan.group_queries.reshape(-1)
    out = out.view(ng, kv_heads, width_t, rep, d).transpose(1, 2).reshape(ng * width_t, heads, d)[real]
    return out, lse.view(ng, kv_heads, width_t, rep).transpose(1, 2).reshape(ng * width_t, heads)[real]


def step_attention_forward(
    plan: StepAttention, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """`q` `[tokens, heads, d]` against the pool `[positions, kv_heads, d]`: float32 `[tokens, heads, d]`."""
    tokens, heads, d = q.shape
    need_lse = plan.has_groups  # without a group every row reads all its keys by itself: no merge
    out = q.new_empty(tokens, heads, d, dtype=torch.float32)
    lse = q.new_empty(tokens, heads, dtype=torch.float32)
    if plan.single_tokens.numel():
        o, l_ = _own_singles(plan, q[plan.single_tokens], key, value, scale, need_lse)
        out[plan.single_tokens] = o
        if l_ is not None:
            lse[plan.single_tokens] = l_
    if plan.chunk_tokens.numel():
        real = plan.chunk_tokens[plan.chunk_queries]
        o, l_ = _own_chunks(plan, q, key, value, scale, need_lse)
        out[real] = o
        if l_ is not None:
            lse[real] = l_
    if plan.has_groups:
        real = plan.group_tokens[plan.group_queries]
        out_p, lse_p = _grouped_prefixes(plan, q, key, value, scale)
        out[real], lse[real] = merge(out[real], lse[real], out_p, lse_p)
    return out


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    step_attention: StepAttention | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`query` `[1, heads, tokens, d]`; `key`/`value`: the pool `[positions, kv_heads, d]`.

    Returns `[1, tokens, heads, d]` as transformers' attention functions do. Without a step plan
    (any other use of the model, e.g. encoding a text prefix) it is plain SDPA.
    """
    if step_attention is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1).contiguous()  # [tokens, heads, d]
    out = step_attention_forward(step_attention, q, key, value, scale)
    return out.to(query.dtype)[None], None


AttentionInterface.register(NAME, paged_attention)
