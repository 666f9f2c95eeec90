"""Admitting, then draining on SIGTERM: new generations get 503, running ones may finish."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Lifecycle:
    """Counts requests in flight (the middleware does) and drains them before the server exits."""

    def __init__(self, drain_seconds: float) -> None:
        self.drain_seconds = drain_seconds
        self.is_draining = False
        self.num_in_flight = 0
        self.end_all: Callable[[], Awaitable[None]] | None = None  # ends whatever still runs

    async def drain(self) -> bool:
        """Refuse new work, wait up to `drain_seconds` for the requests in flight, then end the
        rest with `end_all`. True when everything finished in time."""
        self.is_draining = True
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
