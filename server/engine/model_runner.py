"""Runs the frozen HF model for one mixed step: every row's new tokens in one forward."""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from server.engine import attention
from server.engine.attention_plan import PlanRow, prepare
from server.engine.kv_cache import PagedKVCache, StepCache


@dataclass(frozen=True)
class ForwardRow:
    """One row of a step: `token_ids` follow the row's cached positions (see `PlanRow`)."""

    plan: PlanRow
    token_ids: list[int]
    samples: bool = True  # whether the step needs logits at its last token


class ModelRunner:
    """Prepares the flat inputs (ids, positions, per-row attention plan) and runs the model."""

    def __init__(self, model: PreTrainedModel, kv: PagedKVCache, max_positions: int) -> None:
        self.model = model
        self.kv = kv
        self.device = kv.layout.device
        self.max_positions = max_positions

    @torch.inference_mode()
    def forward(self, rows: list[ForwardRow]) -> torch.Tensor:
        """Run every row's tokens as one sequence; return float32 logits `[sampling rows, vocab]`
        at the last token of each row with `samples`, in row order."""
        ids = [t for r in rows for t in r.token_ids]
        plan = prepare([r.plan for r in rows], self.kv.layout.block_size, self.device)
        ends = torch.tensor([len(r.token_ids) for r in rows]).cumsum(0) - 1
        keep = ends[torch.tensor([r.samples for r in rows], dtype=torch.bool)]
        if not len(keep):
            keep = ends[-1:]  # the model wants at least one position; its logits are dropped
        config = self.model.config
        previous, config._attn_implementation = config._attn_implementation, attention.NAME
        try:  # only this forward uses the paged attention; any other use of the model stays SDPA
            out = self.model(
                input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                position_ids=plan.token_positions.clamp(max=self.max_positions - 1)[None],
                cache=StepCache(self.kv, plan.slot_mapping),
                use_cache=True,
                logits_to_keep=keep.to(self.device),
                step_attention=plan,
            )
        finally:
            config._attn_implementation = previous
        logits = out.logits[0].float()  # [kept, vocab]
        return logits if any(r.samples for r in rows) else logits[:0]
