"""What the scheduler hands the engine core and what it needs from the KV pool: the step's plan
(`ScheduledBatch` of `RowWork`s, `SlotMove`s) and the `BlockBudget` protocol. Pure Python."""

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class HasId(Protocol):
    @property
    def request_id(self) -> str: ...


R = TypeVar("R", bound=HasId)
R_contra = TypeVar("R_contra", bound=HasId, contravariant=True)


class BlockBudget(Protocol[R_contra]):
    """KV blocks as the scheduler sees them; `num_tokens` counts a row's own tokens (prefix excluded)."""

    @property
    def num_available(self) -> int: ...

    def admit(self, request: R_contra, num_tokens: int) -> bool: ...

    def grow(self, request: R_contra, num_tokens: int) -> bool: ...

    def num_needed(self, request: R_contra, num_tokens: int) -> int: ...

    def room(self, request: R_contra) -> int: ...

    def free(self, request: R_contra) -> None: ...


@dataclass(frozen=True)
class SlotMove:
    """Move the row in slot `src` to slot `dst` (compaction after a row left)."""

    request_id: str
    src: int
    dst: int


@dataclass(frozen=True)
class RowWork(Generic[R]):
    """What one row feeds this step: `num_tokens` tokens after the `start` it already has cached."""

    request: R
    slot: int
    start: int  # tokens of this row already in its slot (prefix excluded)
    num_tokens: int
    samples: bool  # the tokens reach the end of its sequence: the step samples its next token


@dataclass(frozen=True)
class ScheduledBatch(Generic[R]):
    """One step's work: `rows` (decode rows first, in slot order, then prefill chunks),
    the requests admitted this step, how many rows were preempted (for fairness, for blocks)
    and the slot moves (apply them before the forward)."""

    rows: list[RowWork[R]] = field(default_factory=list)
    num_decode: int = 0  # rows[:num_decode] were decoding before this step
    admitted: list[R] = field(default_factory=list)
    moves: list[SlotMove] = field(default_factory=list)
    num_preempted_for_fairness: int = 0
    num_preempted_for_blocks: int = 0

    @property
    def num_rows(self) -> int:
        return len(self.rows)
