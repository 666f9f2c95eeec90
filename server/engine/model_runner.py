"""Runs the frozen HF model for one forward pass over contiguous cache slots."""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from server.engine.kv_cache import SlotKVCache, StepCache, WritePlan


@dataclass(frozen=True)
class ForwardRow:
    """One row of a forward pass: new tokens starting at cache position `start`."""

    start: int  # = tokens already in the slot (prefix + earlier tokens)
    token_ids: list[int]


class ModelRunner:
    """Prepares inputs (ids, per-row positions, 4D mask, write plan) and runs the model."""

    def __init__(self, model: PreTrainedModel, kv: SlotKVCache, max_positions: int) -> None:
        self.model = model
        self.kv = kv
        self.device = kv.layout.device
        self.max_positions = max_positions

    @torch.inference_mode()
    def forward(self, slot_start: int, rows: list[ForwardRow]) -> torch.Tensor:
        """Run rows in slots `slot_start..`; return float32 logits `[rows, vocab]` of their last tokens."""
        num_rows = len(rows)
        q_len = max(len(r.token_ids) for r in rows)
        lengths = torch.tensor([len(r.token_ids) for r in rows], dtype=torch.long)
        starts = torch.tensor([r.start for r in rows], dtype=torch.long)
        input_ids = torch.zeros((num_rows, q_len), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
        offsets = torch.arange(q_len, dtype=torch.long)
        positions = starts[:, None] + offsets[None, :]  # [rows, q]
        is_valid = offsets[None, :] < lengths[:, None]  # [rows, q]
        kv_len = int((starts + lengths).max())
        # query j of row i sees cache positions 0..start_i+j (its prefix, its past, itself)
        key_pos = torch.arange(kv_len, dtype=torch.long)
        mask = key_pos[None, None, :] <= positions[:, :, None]  # [rows, q, kv_len]
        row_index, token_index = is_valid.nonzero(as_tuple=True)
        plan = WritePlan(
            slot_start=slot_start,
            num_rows=num_rows,
            kv_len=kv_len,
            row_index=row_index.to(self.device),
            token_index=token_index.to(self.device),
            position_index=positions[row_index, token_index].to(self.device),
        )
        last = lengths - 1  # [rows]
        keep = torch.unique(last)  # sorted distinct query indices whose logits we need
        out = self.model(
            input_ids=input_ids.to(self.device),
            position_ids=positions.clamp(max=self.max_positions - 1).to(self.device),
            attention_mask=mask[:, None].to(self.device),  # [rows, 1, q, kv_len]
            cache=StepCache(self.kv, plan),
            use_cache=True,
            logits_to_keep=keep.to(self.device),
        )
        pick = torch.searchsorted(keep, last).to(self.device)  # [rows] index into kept positions
        logits = out.logits[torch.arange(num_rows, device=self.device), pick]  # [rows, vocab]
        return logits.float()
