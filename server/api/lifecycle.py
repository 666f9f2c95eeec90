"""Admitting, then draining: on SIGTERM (the process then exits) or for maintenance (`POST
/admin/drain`; the process keeps running until `DELETE /admin/drain`). While draining, new
generations get 503 and `/ready` fails; running ones may finish."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Lifecycle:
    """Counts requests in flight (the middleware does) and drains them before the server exits,
    or while an operator holds the replica out of rotation."""

    def __init__(self, drain_seconds: float) -> None:
        self.drain_seconds = drain_seconds
        self.is_stopping = False  # SIGTERM: draining, then the process exits; never undone
        self.is_in_maintenance = False  # POST /admin/drain: out of rotation until undrained
        self.refuse_from = 0.0  # monotonic time from which maintenance refuses new generations
        self.num_in_flight = 0
        self.end_all: Callable[[], Awaitable[None]] | None = None  # ends whatever still runs

    @property
    def is_draining(self) -> bool:
        """`/ready` fails, so a proxy stops sending work (new generations: see `is_refusing`)."""
        return self.is_stopping or self.is_in_maintenance

    @property
    def is_refusing(self) -> bool:
        """New generations get a retry-safe 503: shutting down, or in maintenance past its grace."""
        return self.is_stopping or (self.is_in_maintenance and time.monotonic() >= self.refuse_from)

    def start_maintenance(self, grace_s: float) -> None:
        """`/ready` fails now; new generations are still served for `grace_s`, the time a proxy's
        health checks take to notice (they would otherwise still send work here), then refused."""
        if not self.is_in_maintenance:
            self.is_in_maintenance = True
            self.refuse_from = time.monotonic() + grace_s

    @property
    def refusal(self) -> str:
        """Why a new generation is refused while draining."""
        if self.is_stopping:
            return "the server is shutting down"
        return "this replica is draining for maintenance; another replica takes new requests"

    async def drain(self) -> bool:
        """Refuse new work, wait up to `drain_seconds` for the requests in flight, then end the
        rest with `end_all`. True when everything finished in time."""
        self.is_stopping = True
        deadline = time.monotonic() + self.drain_seconds
        log.warning("draining: %d request(s) in flight, up to %.1f s", self.num_in_flight, self.drain_seconds)
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        is_drained = self.num_in_flight == 0
        if not is_drained:
            log.warning("drain deadline passed with %d request(s) in flight: ending them", self.num_in_flight)
            if self.end_all is not None:
                await self.end_all()
        log.info("drained; shutting down")
        return is_drained
