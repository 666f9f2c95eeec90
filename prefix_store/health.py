"""Redis reachability over time: outages (start, end, duration), for `/ready` and metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class RedisHealth:
    """Fed by periodic probes (`observe`); read at scrape time.

    An outage starts at the first failed probe after a good one and ends at the next good
    probe; its duration is measured between those probes (so it is accurate to one interval).
    """

    is_up: bool = True
    num_outages: int = 0
    down_since: float | None = None  # time.monotonic() of the first failed probe
    last_outage_s: float = 0.0  # duration of the last finished outage
    total_outage_s: float = 0.0  # of every finished outage

    def observe(self, is_ok: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if not is_ok and self.is_up:
            self.is_up, self.down_since = False, now
            self.num_outages += 1
            log.warning("redis unreachable: outage %d started", self.num_outages)
        elif is_ok and not self.is_up:
            duration = now - (self.down_since if self.down_since is not None else now)
            self.is_up, self.down_since = True, None
            self.last_outage_s = duration
            self.total_outage_s += duration
            log.warning("redis reachable again after %.2f s (outage %d)", duration, self.num_outages)

    def current_outage_s(self, now: float | None = None) -> float:
        """Seconds into the outage in progress (0 while up)."""
        if self.down_since is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.down_since
