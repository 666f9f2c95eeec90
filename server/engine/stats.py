"""What the engine reports: a snapshot of its state, one record per step, one per finished request."""

from dataclasses import dataclass, field

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
