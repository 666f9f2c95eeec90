"""What the engine reports: a snapshot of its state, one record per step, one per finished request."""

from collections.abc import Callable
from dataclasses import dataclass, field

from prefix_store.meta import ResidentPrefix, TierUsage
from server.engine.block_pool import BlockStats
from server.engine.request import Request


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for `/metrics` and `/ready`."""

    num_running: int
    num_waiting: int
    num_slots: int  # rows that may run at once (--max-batch-size)
    max_len: int
    is_alive: bool
    kv_used_bytes: int = 0  # blocks held by running rows and the prefixes they use
    kv_capacity_bytes: int = 0  # the pre-allocated pool
    blocks: BlockStats = field(default_factory=BlockStats.empty)  # where the pool's blocks are

    @property
    def bytes_per_block(self) -> int:
        return self.kv_capacity_bytes // self.blocks.num_blocks if self.blocks.num_blocks else 0


class PoolPrefixTier:
    """The prefix cache's device tier, which is the KV pool (a `prefix_store` `DeviceTier`): its
    budget is the whole pool and a resident prefix costs its blocks; read from engine stats."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def usage(self) -> TierUsage:
        stats = self._stats()
        resident_bytes = stats.blocks.num_prefix_blocks * stats.bytes_per_block
        return TierUsage(stats.kv_capacity_bytes, resident_bytes, stats.blocks.num_resident_prefixes)

    def resident(self) -> list[ResidentPrefix]:
        """Resident prefixes, least recently used first; pinned while a row reads one."""
        stats = self._stats()
        return [
            ResidentPrefix(
                "device",
                r.task_id,
                r.version,
                r.num_positions,
                r.num_blocks * stats.bytes_per_block,
                r.num_refs > 0,
            )
            for r in stats.blocks.resident
        ]


@dataclass(frozen=True)
class FinishedRequest:
    """Timings and sizes of one request that left the engine (finished, failed or aborted)."""

    task_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    queue_wait_s: float | None  # submitted -> admitted into a slot (None: never admitted)
    ttft_s: float | None  # submitted -> first token
    tpot_s: float | None  # mean time per output token after the first
    duration_s: float  # submitted -> finished


@dataclass(frozen=True)
class StepStats:
    """What one step did; fed to the metrics by whoever built the engine."""

    num_decode_rows: int
    num_prefill_rows: int
    num_new_tokens: int
    duration_s: float
    finished: tuple[FinishedRequest, ...]  # rows that ended in this step (aborts included)
    num_preempted_for_blocks: int = 0  # rows preempted because the pool ran out of blocks
    num_preempted_for_fairness: int = 0  # rows preempted so that a waiting tenant gets a slot


def finished_request(request: Request, now: float) -> FinishedRequest:
    arrival, first = request.arrival_time, request.first_token_time
    num_out = len(request.output_ids)
    tpot = (now - first) / (num_out - 1) if first is not None and num_out > 1 else None
    return FinishedRequest(
        task_id=request.prefix.meta.task_id,
        finish_reason=str(request.finish_reason),
        num_prompt_tokens=len(request.prompt_ids),
        num_output_tokens=num_out,
        queue_wait_s=None if request.admitted_time is None else request.admitted_time - arrival,
        ttft_s=None if first is None else first - arrival,
        tpot_s=tpot,
        duration_s=now - arrival,
    )
