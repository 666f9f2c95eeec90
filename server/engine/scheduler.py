"""Continuous-batching bookkeeping: who waits, who runs, which slot each row owns.

Pure Python on purpose (no torch): every decision here is unit-tested exactly.
Running rows stay compact in slots `0..n-1`; a retired row's slot is filled by the last row.
"""

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class HasId(Protocol):
    @property
    def request_id(self) -> str: ...


R = TypeVar("R", bound=HasId)


@dataclass(frozen=True)
class SlotMove:
    """Move the row in slot `src` to slot `dst` (compaction after a row retired)."""

    request_id: str
    src: int
    dst: int


@dataclass(frozen=True)
class ScheduledBatch(Generic[R]):
    """One step's work: decode `decode` (slots 0..len-1), prefill `prefill` (the slots after)."""

    decode: list[R]
    prefill: list[R]

    @property
    def prefill_slot_start(self) -> int:
        return len(self.decode)

    @property
    def num_rows(self) -> int:
        return len(self.decode) + len(self.prefill)


def prefill_groups(lengths: list[int], max_padding: float = 0.1) -> list[tuple[int, int]]:
    """Split rows sorted by length (ascending) into contiguous `[start, end)` groups, each padded
    to its longest row with at most `max_padding` of its real tokens wasted on padding."""
    groups: list[tuple[int, int]] = []
    start = 0
    for end in range(2, len(lengths) + 1):
        group = lengths[start:end]
        if max(group) * len(group) - sum(group) > max_padding * sum(group):
            groups.append((start, end - 1))
            start = end - 1
    if lengths:
        groups.append((start, len(lengths)))
    return groups


class Scheduler(Generic[R]):
    """FIFO admission bounded by `max_rows` running rows and `max_queue` waiting ones."""

    def __init__(
        self,
        max_rows: int,
        max_queue: int,
        max_prefill_rows: int | None = None,
        prefill_order: Callable[[R], int] | None = None,
        tenant_of: Callable[[R], str] | None = None,
    ) -> None:
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.max_prefill_rows = max_prefill_rows or max_rows
        self.prefill_order = prefill_order  # admitted rows are laid out in slots sorted by this key
        self.tenant_of = tenant_of  # when set, admission goes round-robin over tenants
        self._last_served: dict[str, int] = {}  # tenant -> admission number (tenants waiting only)
        self._num_admitted = 0
        self.waiting: deque[R] = deque()
        self.running: list[R] = []  # index == slot

    @property
    def is_idle(self) -> bool:
        return not self.waiting and not self.running

    def can_accept(self) -> bool:
        return len(self.waiting) < self.max_queue

    def add(self, request: R) -> None:
        """Queue a request; the caller checks `can_accept` first."""
        self.waiting.append(request)

    def shed_for(self, tenant: str) -> R | None:
        """With a full queue, make room for `tenant` fairly: remove and return the newest waiting
        request of the tenant with the most waiting, if it holds more than `tenant` would with one
        more (so one tenant cannot fill the queue and turn everyone else away); else None."""
        if self.tenant_of is None or not self.waiting:
            return None
        counts = Counter(self.tenant_of(r) for r in self.waiting)
        heaviest, num_heaviest = counts.most_common(1)[0]
        if num_heaviest <= counts[tenant] + 1:
            return None
        index = max(i for i, r in enumerate(self.waiting) if self.tenant_of(r) == heaviest)
        victim = self.waiting[index]
        del self.waiting[index]
        return victim

    def schedule(self) -> ScheduledBatch[R]:
        """Admit waiting requests into free slots; running rows decode as they are."""
        decode = list(self.running)
        prefill: list[R] = []
        while (
            self.waiting
            and len(self.running) + len(prefill) < self.max_rows
            and len(prefill) < self.max_prefill_rows
        ):
            prefill.append(self._next_waiting())
        if self.prefill_order is not None:
            prefill.sort(key=self.prefill_order)  # stable: FIFO among equals
        self.running += prefill
        return ScheduledBatch(decode=decode, prefill=prefill)

    def _next_waiting(self) -> R:
        """FIFO, or with tenants: the oldest request of the least recently served tenant, so a
        tenant with a long queue never delays another tenant's request by more than one round."""
        if self.tenant_of is None:
            return self.waiting.popleft()
        first: dict[str, int] = {}
        for index, request in enumerate(self.waiting):
            first.setdefault(self.tenant_of(request), index)
        tenant = min(first, key=lambda t: (self._last_served.get(t, -1), first[t]))
        request = self.waiting[first[tenant]]
        del self.waiting[first[tenant]]
        self._num_admitted += 1
        self._last_served[tenant] = self._num_admitted
        if len(self._last_served) > 2 * len(first):  # forget tenants that stopped waiting
            self._last_served = {t: n for t, n in self._last_served.items() if t in first}
        return request

    def slot_of(self, request: R) -> int:
        """The slot of a running request (by identity)."""
        return next(slot for slot, r in enumerate(self.running) if r is request)

    def remove_waiting(self, request_id: str) -> R | None:
        """Drop a waiting request (client went away); returns it if it was waiting."""
        for index, request in enumerate(self.waiting):
            if request.request_id == request_id:
                del self.waiting[index]
                return request
        return None

    def retire(self, finished: set[str]) -> list[SlotMove]:
        """Remove finished rows; fill each hole with the current last row.

        Returns the moves to apply, in order.
        """
        moves: list[SlotMove] = []
        slot = 0
        while slot < len(self.running):
            if self.running[slot].request_id not in finished:
                slot += 1
                continue
            last = self.running.pop()
            if slot < len(self.running):
                self.running[slot] = last
                if last.request_id not in finished:
                    moves.append(SlotMove(last.request_id, src=len(self.running), dst=slot))
                # re-check this slot: the row moved in may itself be finished
        return moves
