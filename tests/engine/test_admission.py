"""Exact tests for the front door's queue ledger in `server.engine.admission`."""

from dataclasses import dataclass

import pytest

from server.engine.admission import Admission
from server.engine.errors import QueueFull


@dataclass
class Req:
    request_id: str
    is_started: bool = False  # admitted into a row, or ended: no longer waiting

    @property
    def tenant(self) -> str:
        return self.request_id.split(":", 1)[0]


def _admission(max_queue: int) -> Admission[Req]:
    return Admission(max_queue, lambda r: r.tenant, lambda r: not r.is_started)


def test_the_queue_counts_waiting_requests_only() -> None:
    admission = _admission(max_queue=2)
    first, second = Req("a:1"), Req("a:2")
    assert admission.add(first) is None and admission.add(second) is None
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        admission.add(Req("a:3"))
    first.is_started = True  # the engine thread admitted it: running rows do not count
    assert admission.num_waiting == 1
    assert admission.add(Req("a:3")) is None
    admission.remove("a:2")  # its caller left
    assert admission.num_waiting == 1
    admission.remove("a:2")  # twice is harmless
    assert admission.num_waiting == 1


def test_a_full_queue_sheds_the_heaviest_tenants_newest_request_for_a_lighter_tenant() -> None:
    """Max-min fair queue: a tenant that filled the queue gives way, one request at a time, until
    the newcomer's tenant holds as many (within one); then the queue is simply full."""
    admission = _admission(max_queue=4)
    for name in ("a:1", "a:2", "a:3", "a:4"):
        admission.add(Req(name))
    shed = []
    for name in ("b:1", "b:2"):
        victim = admission.add(Req(name))
        assert victim is not None
        shed.append(victim.request_id)
    assert shed == ["a:4", "a:3"]
    with pytest.raises(QueueFull):  # a 2, b 2: b would hold more than a with one more
        admission.add(Req("b:3"))
    with pytest.raises(QueueFull):  # nor may a take one back
        admission.add(Req("a:5"))
    assert admission.num_waiting == 4


def test_can_take_answers_what_adding_would_do_without_adding() -> None:
    """Admission asks the queue before any work: room first, then the shedding `add` would do."""
    admission = _admission(max_queue=4)
    for name in ("a:1", "a:2", "a:3"):
        admission.add(Req(name))
    assert admission.can_take("a", 1) and not admission.can_take("a", 2)
    # b: one in the room, then a:3 is shed; a third would shed nothing (b would hold as many as a)
    assert admission.can_take("b", 2) and not admission.can_take("b", 3)
    assert admission.num_waiting == 3  # nothing changed
    assert admission.add(Req("b:1")) is None
    assert admission.add(Req("b:2")) == Req("a:3")
    with pytest.raises(QueueFull):
        admission.add(Req("b:3"))


def test_started_requests_leave_room_for_can_take() -> None:
    admission = _admission(max_queue=1)
    waiting = Req("a:1")
    admission.add(waiting)
    assert not admission.can_take("a", 1)
    waiting.is_started = True
    assert admission.can_take("a", 1)
