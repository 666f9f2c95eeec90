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
        # float32, exact up to 2**24: an int table would be converted to float for every step
        self._counts: torch.Tensor | None = None  # [num_slots, vocab] float32: generated ids
        self._seen: torch.Tensor | None = None  # [num_slots, vocab] bool: prompt or generated ids
        self._work: torch.Tensor | None = None  # [3, capacity, vocab] float32: apply()'s scratch
        self._work_mask: torch.Tensor | None = None  # [capacity, vocab] bool

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._counts is None or self._seen is None:
            shape = (self.num_slots, self.vocab)
            self._counts = torch.zeros(shape, dtype=torch.float32, device=self.device)
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

    def _scratch(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Three `[num_rows, vocab]` float32 work tensors, reused from step to step (grown in powers
        of two up to the number of slots, so a few penalised rows never hold room for all)."""
        if self._work is None or self._work.shape[1] < num_rows:
            capacity = min(self.num_slots, 1 << (num_rows - 1).bit_length())
            self._work = torch.empty((3, capacity, self.vocab), dtype=torch.float32, device=self.device)
            self._work_mask = torch.empty((capacity, self.vocab), dtype=torch.bool, device=self.device)
        return self._work[0, :num_rows], self._work[1, :num_rows], self._work[2, :num_rows]

    def _mask(self, num_rows: int) -> torch.Tensor:
        """A `[num_rows, vocab]` bool work tensor (allocated with `_scratch`'s)."""
        assert self._work_mask is not None, "call _scratch first"
        return self._work_mask[:num_rows]

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
        """The penalised rows of `logits` `[rows, vocab]`, penalised: `[p, vocab]`, valid until the
        next step (it lives in the table's scratch space); `logits` stays as is, for raw logprobs.

        Every operation writes into scratch tensors kept from step to step: on a CPU a fresh
        `[p, vocab]` temporary costs more in page faults than the arithmetic on it."""
        counts_table, seen_table = self.table._tables()
        rows, work, counts = self.table._scratch(len(self.row_list))  # [p, vocab] float32 each
        mask = self.table._mask(len(self.row_list))  # [p, vocab] bool
        torch.index_select(logits, 0, self.rows, out=rows)  # far faster than logits[index] on CPU
        if self.has_repetition:  # HF: score < 0 ? score * penalty : score / penalty, on seen tokens
            torch.div(rows, self.repetition, out=work)
            torch.mul(rows, self.repetition, out=counts)
            torch.lt(rows, 0, out=mask)
            torch.where(mask, counts, work, out=work)
            torch.index_select(seen_table, 0, self.slots, out=mask)
            torch.where(mask, work, rows, out=rows)
        if self.has_frequency or self.has_presence:
            torch.index_select(counts_table, 0, self.slots, out=counts)
            if self.has_frequency:
                rows.sub_(torch.mul(counts, self.frequency, out=work))
            if self.has_presence:
                rows.sub_(torch.mul(counts.clamp_(max=1.0), self.presence, out=work))  # counts >= 0
        return rows

    def record(self, chosen: torch.Tensor) -> None:
        """Count this step's sampled ids (`chosen` `[rows]`, still on the device)."""
        counts, seen = self.table._tables()
        tokens = chosen[self.rows]
        counts.index_put_((self.slots, tokens), torch.ones_like(tokens, dtype=counts.dtype), accumulate=True)
        seen[self.slots, tokens] = True
