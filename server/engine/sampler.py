"""Turns logits into token ids for a whole step at once: penalties on the rows that have them,
greedy rows by argmax, sampled rows filtered together over `[rows, vocab]` and drawn with their own
generator; one host sync.

Reported logprobs are of the model's raw distribution (before penalties, temperature, top-k and
top-p), as vLLM reports them by default (its `logprobs_mode="raw_logprobs"`)."""

import torch

from server.engine.penalties import StepPenalties
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


def filter_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on every row of `[rows, vocab]`; returns
    probabilities. Row by row it computes exactly what it would alone."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    scaled = logits / temperature[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        values = torch.topk(scaled, max(top_k), dim=-1).values  # [rows, max k]
        index = torch.tensor([max(k - 1, 0) for k in top_k], device=device)
        kth = values.gather(1, index[:, None])  # the k-th largest of each row
        kth = torch.where(torch.tensor(top_k, device=device)[:, None] > 0, kth, float("-inf"))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=device)
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly before each token
        drop = before >= top_p[:, None]
        drop[:, 0] = False  # the top token always stays, even when top_p rounds to 0.0 in float32
        drop &= (top_p < 1.0)[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        nucleus = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        nucleus = nucleus / nucleus.sum(dim=-1, keepdim=True)
        probs = torch.where((top_p < 1.0)[:, None], nucleus, probs)
    return probs


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    penalties: StepPenalties | None = None,
) -> list[int]:
    """Pick one id per row of `logits` `[rows, vocab]` (float32), after the rows' penalties
    (`penalties`: None when no row has any); the sampled ids are added to their histories."""
    if len(params) != len(generators):
        raise ValueError(f"{len(params)} params but {len(generators)} generators")
    chosen = logits.argmax(dim=-1)  # [rows]
    if penalties is not None:
        penalised = penalties.apply(logits)  # [p, vocab]
        chosen[penalties.rows] = penalised.argmax(dim=-1)
    rows = [row for row, p in enumerate(params) if not p.is_greedy]
    if rows:
        picked = logits[rows]  # [sampled rows, vocab], a copy
        if penalties is not None:
            _replace_rows(picked, rows, penalised, penalties.row_list)
        probs = filter_probs(picked, [params[row] for row in rows])
        # e.g. a temperature so small that logits / T overflow: such a row stays greedy
        is_valid = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
        fallback = torch.nn.functional.one_hot(chosen[rows], probs.shape[-1]).to(probs.dtype)
        probs = torch.where(is_valid[:, None], probs, fallback)  # no host check needed per row
        drawn = torch.cat(
            [torch.multinomial(probs[i], 1, generator=generators[row]) for i, row in enumerate(rows)]
        )
        chosen[rows] = drawn
    if penalties is not None:
        penalties.record(chosen)  # on the device, before the sync
    return [int(t) for t in chosen.tolist()]  # the step's one host sync


def _replace_rows(
    picked: torch.Tensor, rows: list[int], penalised: torch.Tensor, penalised_rows: list[int]
) -> None:
    """Put the penalised rows' logits in place of their raw ones among the sampled rows."""
    position = {row: i for i, row in enumerate(rows)}
    pairs = [(position[row], j) for j, row in enumerate(penalised_rows) if row in position]
    if pairs:
        picked[[i for i, _ in pairs]] = penalised[[j for _, j in pairs]]


def token_logprobs(
    logits: torch.Tensor, chosen: list[int], params: list[SamplingParams]
) -> list[tuple[float, tuple[tuple[int, float], ...]] | None]:
    """Per row that asked: the chosen id's log-probability under the model (raw: before
    penalties and sampling filters, vLLM's default) and the top-k alternatives; None for rows
    that did not ask."""
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    results: list[tuple[float, tuple[tuple[int, float], ...]] | None] = [None] * len(params)
    if not wanted:
        return results
    logprobs = torch.log_softmax(logits[wanted], dim=-1)  # [wanted, vocab]
    picked = logprobs.gather(1, torch.tensor([chosen[row] for row in wanted], device=logits.device)[:, None])
    max_k = max(params[row].logprobs or 0 for row in wanted)
    top = torch.topk(logprobs, max_k, dim=-1) if max_k else None
    picked_list = picked[:, 0].tolist()
    top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    for i, row in enumerate(wanted):
        k = params[row].logprobs or 0
        alternatives = tuple(zip(top_ids[i][:k], top_values[i][:k], strict=True)) if k else ()
        results[row] = (picked_list[i], alternatives)
    return results
