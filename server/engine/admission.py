"""The front door's queue ledger: which submitted requests still wait for a row, per tenant.

A full queue must answer at once, in the caller's thread: `QueueFull` (HTTP 429) or the shed of
the heaviest tenant's newest request, and `has_room` before any work is done for a request.
The core cannot answer that: its scheduler belongs to the engine thread and takes no lock, so
nothing else may read it while a step runs. The front door keeps this ledger instead, under its
own lock. A request enters it when submitted and leaves it when the front door removes it
(aborted, shed) or once the engine thread marked it admitted or ended (`is_waiting` turns false:
flags the engine thread writes and the ledger only reads, so a request may count as waiting one
step longer than it does; the queue then errs on the side of full, never over its bound).

Pure Python, tested exactly.
"""

from collections import Counter
from collections.abc import Callable
from typing import Generic, TypeVar

from server.engine.errors import QueueFull
from server.engine.scheduler import HasId

R = TypeVar("R", bound=HasId)


class Admission(Generic[R]):
    """At most `max_queue` waiting requests, shared max-min fairly between tenants when full."""

    def __init__(
        self, max_queue: int, tenant_of: Callable[[R], str], is_waiting: Callable[[R], bool]
    ) -> None:
        self.max_queue = max_queue
        self.tenant_of = tenant_of
        self.is_waiting = is_waiting
        self._waiting: dict[str, R] = {}  # request id -> request, oldest first

    @property
    def num_waiting(self) -> int:
        self._forget_started()
        return len(self._waiting)

    def add(self, request: R) -> R | None:
        """Count `request` as waiting. With a full queue, it takes the place of the newest request
        of the tenant with the most waiting (returned: the caller ends it as shed), if that tenant
        holds more than the newcomer's would with it; else raises QueueFull."""
        shed = None
        if self.num_waiting >= self.max_queue:
            shed = self._shed_for(self.tenant_of(request))
            if shed is None:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
        self._waiting[request.request_id] = request
        return shed

    def remove(self, request_id: str) -> None:
        """The request stopped waiting (its caller left)."""
        self._waiting.pop(request_id, None)

    def can_take(self, tenant: str, num: int) -> bool:
        """Whether `num` more requests of `tenant` would be queued now, shedding as `add` would
        when the queue is full; changes nothing (admission asks before any work)."""
        room = self.max_queue - self.num_waiting
        if num <= room:
            return True
        counts = Counter(self.tenant_of(r) for r in self._waiting.values())
        counts[tenant] += max(0, room)
        for _ in range(num - max(0, room)):
            heaviest, num_heaviest = counts.most_common(1)[0]
            if num_heaviest <= counts[tenant] + 1:
                return False
            counts[heaviest] -= 1
            counts[tenant] += 1
        return True

    def _shed_for(self, tenant: str) -> R | None:
        """Remove and return the newest waiting request of the tenant with the most waiting, if it
        holds more than `tenant` would with one more (so one tenant cannot fill the queue and turn
        everyone else away); else None."""
        if not self._waiting:
            return None
        counts = Counter(self.tenant_of(r) for r in self._waiting.values())
        heaviest, num_heaviest = counts.most_common(1)[0]
        if num_heaviest <= counts[tenant] + 1:
            return None
        victim = next(r for r in reversed(self._waiting.values()) if self.tenant_of(r) == heaviest)
        del self._waiting[victim.request_id]
        return victim

    def _forget_started(self) -> None:
        started = [request_id for request_id, r in self._waiting.items() if not self.is_waiting(r)]
        for request_id in started:
            del self._waiting[request_id]
