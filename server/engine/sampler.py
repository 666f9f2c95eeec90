"""Turns logits into token ids: greedy rows by argmax, sampled rows with their own generator."""

import torch

from server.engine.request import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator, so a seeded request samples the same ids in any batch."""
    if params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed % 2**64)  # torch takes [-2**63, 2**64); same bits for those
    return generator


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row `[vocab]`; returns probabilities."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly before each token
        drop = before >= params.top_p
        drop[0] = False  # the top token always stays, even when top_p rounds to 0.0 in float32
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Pick one id per row of `logits` `[rows, vocab]` (float32)."""
    chosen = logits.argmax(dim=-1)  # [rows]
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.is_greedy:
            continue
        probs = filter_logits(logits[row], p)
        if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
            continue  # e.g. a temperature so small that logits / T overflow: the row stays greedy
        chosen[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return [int(t) for t in chosen.tolist()]


def token_logprobs(
    logits: torch.Tensor, chosen: list[int], params: list[SamplingParams]
) -> list[tuple[float, tuple[tuple[int, float], ...]] | None]:
    """Per row that asked: the chosen id's log-probability under the model (before sampling
    filters) and the top-k alternatives; None for rows that did not ask."""
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    results: list[tuple[float, tuple[tuple[int, float], ...]] | None] = [None] * len(params)
    if not wanted:
        return results
    logprobs = torch.log_softmax(logits[wanted], dim=-1)  # [wanted, vocab]
    for i, row in enumerate(wanted):
        k = params[row].logprobs or 0
        top = torch.topk(logprobs[i], k) if k else None
        alternatives = (
            tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
        )
        results[row] = (float(logprobs[i, chosen[row]]), alternatives)
    return results
