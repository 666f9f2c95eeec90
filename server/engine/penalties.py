"""Sampling penalties over a step's `[rows, vocab]` logits, as vLLM applies them (before
temperature, top-k and top-p): first HF's repetition penalty over the prompt and the generated
tokens (a seen token's logit is divided by the penalty, multiplied when negative), then OpenAI's
frequency and presence penalties over the generated tokens only
(`logit -= count * frequency + (count > 0) * presence`).

A penalised row's token history lives on the model's device, one table row per KV slot: how many
times it generated each id, and which ids it has seen (prompt or generated). The table row is
loaded once when the request gets its slot (from its prompt and, after a preemption, what it
generated), follows the slot when rows are compacted, and every step adds the sampled ids on the
device, so nothing is re-scanned and nothing waits for the host. Rows without penalties own no
state: a step with none never touches the table, and the table is not even allocated until a
penalised request arrives. A step works over its penalised rows only (`[p, vocab]`), only for the
kinds of penalty some of them have; the other rows' logits are not even copied.
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
        self._seen: torch.Tensor | None = None  # [num_slots, vocab] bool: prompt or generated ids

    @property
    def is_allocated(self) -> bool:
        return self._counts is not None

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._counts is None or self._seen is None:
            shape = (self.num_slots, self.vocab)
            self._counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
        return self._counts, self._seen

    def load(self, slot: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Start `slot`'s history for a request that just got it (once per admission)."""
        counts, seen = self._tables()
        output = [t for t in output_ids if 0 <= t < self.vocab]  # a resumed row's tokens so far
        counts[slot] = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=self.vocab).to(counts)
        seen[slot] = counts[slot] > 0
        prompt = torch.tensor([t for t in prompt_ids if 0 <= t < self.vocab], dtype=torch.long)
        seen[slot, prompt.to(self.device)] = True

    def move(self, src: int, dst: int) -> None:
        """Follow a row moved from slot `src` to `dst` (compaction after a row left)."""
        counts, seen = self._tables()
        counts[dst] = counts[src]
        seen[dst] = seen[src]

    def for_step(self, params: list[SamplingParams], slots: list[int]) -> StepPenalties | None:
        """The penalties of one step's sampling rows (`params[i]` samples from slot `slots[i]`),
        or None when no row has any: then the step costs exactly what it did without them."""
        rows = [i for i, p in enumerate(params) if p.has_penalties]
        if not rows:
            return None
        self._tables()

        def column(values: list[float]) -> torch.Tensor:  # one small host-to-device copy, no sync
            return torch.tensor(values, dtype=torch.float32).to(self.device, non_blocking=True)[:, None]

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        penalised = [params[i] for i in rows]
        return StepPenalties(
            self,
            rows,
            index(rows),
            index([slots[i] for i in rows]),
            column([p.frequency_penalty for p in penalised]),
            column([p.presence_penalty for p in penalised]),
            column([p.repetition_penalty for p in penalised]),
            any(p.frequency_penalty != 0.0 for p in penalised),
            any(p.presence_penalty != 0.0 for p in penalised),
            any(p.repetition_penalty != 1.0 for p in penalised),
        )


@dataclass(frozen=True)
class StepPenalties:
    """What one step applies: the penalised rows of its logits and their slots and settings."""

    table: PenaltyTable
    row_list: list[int]  # indices into the step's logits of the penalised rows
    rows: torch.Tensor  # [p] the same, on the device
    slots: torch.Tensor  # [p] their KV slots (= table rows)
    frequency: torch.Tensor  # [p, 1]
    presence: torch.Tensor  # [p, 1]
    repetition: torch.Tensor  # [p, 1]
    has_frequency: bool  # some row has this penalty (else the step skips its work)
    has_presence: bool
    has_repetition: bool

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The penalised rows of `logits` `[rows, vocab]`, penalised: `[p, vocab]` (a new tensor;
        `logits` stays as it is, for the raw logprobs)."""
        counts_table, seen_table = self.table._tables()
        rows = logits[self.rows]  # [p, vocab]
        if self.has_repetition:
            scaled = torch.where(rows < 0, rows * self.repetition, rows / self.repetition)
            rows = torch.where(seen_table[self.slots], scaled, rows)
        if self.has_frequency or self.has_presence:
            counts = counts_table[self.slots]  # [p, vocab]
            if self.has_frequency:
                rows -= counts * self.frequency
            if self.has_presence:
                rows -= (counts > 0) * self.presence
        return rows

    def record(self, chosen: torch.Tensor) -> None:
        """Count this step's sampled ids (`chosen` `[rows]`, still on the device)."""
        counts, seen = self.table._tables()
        tokens = chosen[self.rows]
        counts.index_put_((self.slots, tokens), torch.ones_like(tokens, dtype=counts.dtype), accumulate=True)
        seen[self.slots, tokens] = True
