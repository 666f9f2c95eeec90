"""Exact attention over the paged pool for a mixed step, plugged into transformers as an
attention function; every row's prefix part is computed per *task*, not per row.

A mixed step runs every token of the step as one sequence `[1, tokens]`, so the linear layers
see all of them at once. Attention stays per row, in two parts merged exactly by log-sum-exp
(Hydragen, arXiv 2402.05099; FlashInfer's cascade attention):
- prefix part: the queries of every row of one prefix (decode tokens and prefill chunks alike;
  no mask, every query sees the whole prefix) against that prefix's K/V as one matrix product,
  the query heads that share a KV head folded into the query dimension;
- own part: rows feeding one token attend to their own positions together (one batched product
  over a padded gather, with a length mask); each row feeding a chunk attends alone, causally.
Pure PyTorch: the same code on CPU and CUDA. The plan (`StepAttention`) is built once a step
(attention_plan.py) and read by every layer.
"""

from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine.attention_plan import StepAttention

NAME = "prefix_paged"


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention returning float32 `(out [..., M, d], lse [..., M])`.

    `q` `[..., M, d]`, `k`/`v` `[..., N, d]`, `mask` (True: attend) broadcastable to `[..., M, N]`.
    Without `need_lse` it is one fused SDPA call (and lse is None)."""
    if not need_lse:
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).float(), None
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [..., M, N]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [..., M]
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs.to(v.dtype), v).float(), lse


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys `A ∪ B` from attention over each: `out [..., d]`, `lse [...]`."""
    lse = torch.logaddexp(lse_a, lse_b)
    return torch.exp(lse_a - lse)[..., None] * out_a + torch.exp(lse_b - lse)[..., None] * out_b, lse


def _own_singles(
    plan: StepAttention, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One-token rows against the keys each reads by itself: `[n1, heads, d]`, `[n1, heads]`."""
    n1, heads, d = q.shape
    kv_heads = key.shape[1]
    width = plan.single_positions.shape[1]
    qs = q.view(n1, kv_heads, heads // kv_heads, d)  # [n1, kv_heads, rep, d]
    where = plan.single_positions.reshape(-1)  # a flat index_select: far cheaper than a 2-D gather
    ks = key.index_select(0, where).view(n1, width, kv_heads, d).permute(0, 2, 1, 3)  # [n1, kv_heads, L, d]
    vs = value.index_select(0, where).view(n1, width, kv_heads, d).permute(0, 2, 1, 3)
    out, lse = attend(qs, ks, vs, scale, plan.single_mask[:, None, None, :], need_lse)
    return out.reshape(n1, heads, d), None if lse is None else lse.reshape(n1, heads)


def _own_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk `q` `[length, heads, d]` against the keys its row reads by itself `[L, kv_heads, d]`."""
    length, heads, d = q.shape
    kv_heads = k.shape[1]
    qc = q.view(length, kv_heads, heads // kv_heads, d).permute(1, 2, 0, 3)  # [kv_heads, rep, length, d]
    kc, vc = k.transpose(0, 1)[:, None], v.transpose(0, 1)[:, None]  # [kv_heads, 1, L, d]
    out, lse = attend(qc, kc, vc, scale, mask, need_lse)  # [kv_heads, rep, length, (d)]
    out = out.permute(2, 0, 1, 3).reshape(length, heads, d)
    return out, None if lse is None else lse.permute(2, 0, 1).reshape(length, heads)


def grouped_prefix(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query `[T, heads, d]` of one prefix's rows against its K/V `[P, kv_heads, d]` as one
    product per KV head (GQA folded: `[kv_heads, T * rep, d]`); no mask."""
    tokens, heads, d = q.shape
    kv_heads = k.shape[1]
    rep = heads // kv_heads
    qg = q.view(tokens, kv_heads, rep, d).transpose(0, 1).reshape(kv_heads, tokens * rep, d)
    out, lse = attend(qg, k.transpose(0, 1), v.transpose(0, 1), scale)  # [kv_heads, T * rep, (d)]
    assert lse is not None
    out = out.view(kv_heads, tokens, rep, d).transpose(0, 1).reshape(tokens, heads, d)
    return out, lse.view(kv_heads, tokens, rep).transpose(0, 1).reshape(tokens, heads)


def step_attention_forward(
    plan: StepAttention, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """`q` `[tokens, heads, d]` against the pool `[positions, kv_heads, d]`: float32 `[tokens, heads, d]`."""
    tokens, heads, d = q.shape
    need_lse = bool(plan.groups)  # without a group every row reads all its keys by itself: no merge
    out = q.new_empty(tokens, heads, d, dtype=torch.float32)
    lse = q.new_empty(tokens, heads, dtype=torch.float32)
    if plan.single_tokens.numel():
        o, l_ = _own_singles(plan, q[plan.single_tokens], key, value, scale, need_lse)
        out[plan.single_tokens] = o
        if l_ is not None:
            lse[plan.single_tokens] = l_
    for chunk in plan.chunks:
        span = slice(chunk.offset, chunk.offset + chunk.length)
        k, v = key[chunk.positions], value[chunk.positions]  # [L, kv_heads, d]
        out[span], l_ = _own_chunk(q[span], k, v, chunk.mask, scale, need_lse)
        if l_ is not None:
            lse[span] = l_
    for group in plan.groups:
        k, v = key[group.positions], value[group.positions]  # [P, kv_heads, d]
        out_p, lse_p = grouped_prefix(q[group.tokens], k, v, scale)
        out[group.tokens], lse[group.tokens] = merge(out[group.tokens], lse[group.tokens], out_p, lse_p)
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
