"""Sampling penalties over a step's `[rows, vocab]` logits, as vLLM applies them (before
temperature, top-k and top-p): first HF's repetition penalty over the prompt and the generated
tokens (a seen token's logit is divided by the penalty, multiplied when negative), then OpenAI's
frequency and presence penalties over the generated tokens only
(`logit -= count * frequency + (count > 0) * presence`).

A penalised row's token history lives on the model's device, one table row per KV slot: how many
times it generated each id, and which ids its prompt holds. The table row is loaded once when the
request gets its slot (from its prompt and, after a preemption, what it generated), follows the
slot when rows are compacted, and every step adds the sampled ids on the device, so nothing is
re-scanned and nothing waits for the host. Rows without penalties own no state: a step with none
never touches the table, and the table is not even allocated until a penalised request arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams


class PenaltyTable:
    """Token history of the penalised rows, indexed by KV slot, on the model's device."""

    def __init__(self, num_slots: int, vocab: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.vocab = vocab
        self.device = device
        self._counts: torch.Tensor | None = None  # [num_slots, vocab] int32: generated ids
        self._in_prompt: torch.Tensor | None = None  # [num_slots, vocab] bool: prompt ids

    @property
    def is_allocated(self) -> bool:
        return self._counts is not None

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._counts is None or self._in_prompt is None:
            shape = (self.num_slots, self.vocab)
            self._counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._in_prompt = torch.zeros(shape, dtype=torch.bool, device=self.device)
        return self._counts, self._in_prompt

    def load(self, slot: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Start `slot`'s history for a request that just got it (once per admission)."""
        counts, in_prompt = self._tables()
        counts[slot].zero_()
        in_prompt[slot].zero_()
        prompt = torch.tensor([t for t in prompt_ids if 0 <= t < self.vocab], dtype=torch.long)
        in_prompt[slot, prompt.to(self.device)] = True
        output = [t for t in output_ids if 0 <= t < self.vocab]  # a resumed row's tokens so far
        if output:
            counts[slot] = torch.bincount(torch.tensor(output), minlength=self.vocab).to(counts)

    def move(self, src: int, dst: int) -> None:
        """Follow a row moved from slot `src` to `dst` (compaction after a row left)."""
        counts, in_prompt = self._tables()
        counts[dst] = counts[src]
        in_prompt[dst] = in_prompt[src]

    def for_step(self, params: list[SamplingParams], slots: list[int]) -> StepPenalties | None:
        """The penalties of one step's sampling rows (`params[i]` samples from slot `slots[i]`),
        or None when no row has any: then the step costs exactly what it did without them."""
        rows = [i for i, p in enumerate(params) if p.has_penalties]
        if not rows:
            return None
        self._tables()

        def column(values: list[float]) -> torch.Tensor:  # one small host-to-device copy, no sync
            return torch.tensor(values, dtype=torch.float32).to(self.device, non_blocking=True)[:, None]

        return StepPenalties(
            self,
            torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True),
            torch.tensor([slots[i] for i in rows], dtype=torch.long).to(self.device, non_blocking=True),
            column([params[i].frequency_penalty for i in rows]),
            column([params[i].presence_penalty for i in rows]),
            column([params[i].repetition_penalty for i in rows]),
            any(params[i].repetition_penalty != 1.0 for i in rows),
        )


@dataclass(frozen=True)
class StepPenalties:
    """What one step applies: the penalised rows of its logits and their slots and settings."""

    table: PenaltyTable
    rows: torch.Tensor  # [p] indices into the step's logits
    slots: torch.Tensor  # [p] their KV slots (= table rows)
    frequency: torch.Tensor  # [p, 1]
    presence: torch.Tensor  # [p, 1]
    repetition: torch.Tensor  # [p, 1]
    has_repetition: bool  # some row's repetition penalty is not 1 (else the prompt mask is skipped)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """New logits `[rows, vocab]` with the penalised rows changed (`logits` is left as it is)."""
        counts_table, in_prompt_table = self.table._tables()
        counts = counts_table[self.slots]  # [p, vocab]
        is_generated = counts > 0
        rows = logits[self.rows]  # [p, vocab]
        if self.has_repetition:
            is_seen = is_generated | in_prompt_table[self.slots]
            scaled = torch.where(rows < 0, rows * self.repetition, rows / self.repetition)
            rows = torch.where(is_seen, scaled, rows)
        rows = rows - counts * self.frequency - is_generated * self.presence
        return logits.index_copy(0, self.rows, rows)

    def record(self, chosen: torch.Tensor) -> None:
        """Count this step's sampled ids (`chosen` `[rows]`, still on the device)."""
        counts, _ = self.table._tables()
        ones = torch.ones(len(self.slots), dtype=counts.dtype, device=counts.device)
        counts.index_put_((self.slots, chosen[self.rows]), ones, accumulate=True)
