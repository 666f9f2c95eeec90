"""A byte-bounded LRU of prefix entries: the host tier (the device tier is the KV pool)."""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from prefix_store.entry import PrefixEntry


@dataclass
class TierStats:
    """Counters and gauges of one tier, read by the metrics collector at scrape time."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    resident_bytes: int = 0
    resident_count: int = 0


class ByteLRU:
    """Evicts least-recently-used entries by bytes, never by count, and never a pinned one."""

    def __init__(self, name: str, capacity_bytes: int, is_pinned: Callable[[str], bool]) -> None:
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.stats = TierStats()
        self._is_pinned = is_pinned
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()

    def get(self, task_id: str) -> PrefixEntry | None:
        """Look up and count a hit or a miss; a hit becomes the most recent."""
        entry = self._entries.get(task_id)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(task_id)
        self.stats.hits += 1
        return entry

    def peek(self, task_id: str) -> PrefixEntry | None:
        """Look up without counting or reordering."""
        return self._entries.get(task_id)

    def put(self, task_id: str, entry: PrefixEntry) -> bool:
        """Insert, evicting unpinned LRU entries to make room. False (not kept) if it cannot fit."""
        self.pop(task_id)
        if entry.num_bytes > self.capacity_bytes:
            return False
        free = self.capacity_bytes - self.stats.resident_bytes
        victims: list[str] = []
        for key, resident in self._entries.items():  # least recent first
            if free >= entry.num_bytes:
                break
            if not self._is_pinned(key):
                victims.append(key)
                free += resident.num_bytes
        if free < entry.num_bytes:
            return False  # everything evictable would not make room: leave the pinned ones be
        for key in victims:
            self.pop(key)
            self.stats.evictions += 1
        self._entries[task_id] = entry
        self._account(entry, +1)
        return True

    def pop(self, task_id: str) -> PrefixEntry | None:
        entry = self._entries.pop(task_id, None)
        if entry is not None:
            self._account(entry, -1)
        return entry

    def items(self) -> list[tuple[str, PrefixEntry]]:
        """Resident entries, least recent first."""
        return list(self._entries.items())

    def _account(self, entry: PrefixEntry, sign: int) -> None:
        self.stats.resident_bytes += sign * entry.num_bytes
        self.stats.resident_count += sign
