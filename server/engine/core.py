"""EngineCore: the synchronous step loop (no threads, no asyncio).

`add(request)`, `abort(request_id)`, `step() -> list[StepOutput]`; one step is
schedule -> prepare inputs -> run model -> sample -> postprocess. Another thread may call
`add`/`abort` while a step runs: the scheduler's state is guarded by `lock` (a step holds it
only while it plans or retires rows, never during the forward).
"""

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch

from server.engine.attention_plan import PlanRow
from server.engine.block_pool import RequestBlocks
from server.engine.errors import QueueFull
from server.engine.kv_cache import PagedKVCache
from server.engine.model_loader import LoadedModel
from server.engine.model_runner import ForwardRow, ModelRunner
from server.engine.penalties import PenaltyTable
from server.engine.postprocess import append_token
from server.engine.request import FinishReason, Request, StepOutput
from server.engine.sampler import sample, token_logprobs
from server.engine.scheduler import RowWork, ScheduledBatch, Scheduler, SlotMove
from server.engine.stats import StepStats, finished_request

log = logging.getLogger(__name__)

# a prefill chunk stretches a step holding decode rows to about this many decode steps at most
# (stall-free batching, Sarathi-Serve): long prompts cost the running rows little, by default
MAX_DECODE_STALL = 1.5


class EngineCore:
    """Continuous batching with mixed prefill/decode steps over the paged KV pool."""

    def __init__(
        self,
        loaded: LoadedModel,
        kv: PagedKVCache,
        max_queue: int,
        max_num_batched_tokens: int | None = 512,
        max_rows_per_tenant: int | None = None,
        request_timeout_s: float | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        max_chunk_tokens: int | None = None,
    ) -> None:
        self.loaded = loaded
        self.kv = kv
        self.runner = ModelRunner(loaded.model, kv, loaded.max_positions)
        self.scheduler: Scheduler[Request] = Scheduler(
            kv.layout.num_slots,
            max_queue,
            tenant_of=lambda r: r.tenant,
            num_tokens_of=lambda r: len(r.prompt_ids) + len(r.output_ids),  # a preempted row recomputes
            max_num_tokens=max_num_batched_tokens,
            max_rows_per_tenant=max_rows_per_tenant,
            max_chunk_tokens=max_chunk_tokens,
            blocks=RequestBlocks(kv.pool),
            max_stall=MAX_DECODE_STALL,
        )
        output_embeddings = loaded.model.get_output_embeddings()
        vocab = output_embeddings.weight.shape[0] if output_embeddings is not None else loaded.vocab_size
        # the penalised rows' token histories (allocated when the first penalised request comes)
        self.penalties = PenaltyTable(kv.layout.num_slots, int(vocab), kv.layout.device)
        self.request_timeout_s = request_timeout_s
        self.on_step = on_step
        self.lock = threading.RLock()
        self._aborted: set[str] = set()

    @property
    def is_idle(self) -> bool:
        """Nothing to step: no pending abort, no waiting request, no unpaused running row."""
        return self.scheduler.is_idle and not self._aborted

    def add(self, request: Request) -> list[StepOutput]:
        """Queue a request. With a full queue, a lighter tenant's request takes the place of the
        heaviest tenant's newest one (its 'shed' output is returned); else raises QueueFull."""
        with self.lock:
            shed = None
            if not self.scheduler.can_accept():
                shed = self.scheduler.shed_for(request.tenant)
                if shed is None:
                    raise QueueFull(f"{len(self.scheduler.waiting)} requests are already waiting")
            self.scheduler.add(request)
        if shed is None:
            return []
        shed.finish_reason = "shed"
        message = f"the queue is full and tenant {shed.tenant!r} holds the most of it: retry later"
        return [StepOutput(shed.request_id, [], "", "shed", error=message)]

    def pause(self, request_id: str) -> None:
        """Stop decoding a running row (its reader is behind) without giving up its slot."""
        with self.lock:
            if any(r.request_id == request_id for r in self.scheduler.running):
                self.scheduler.paused.add(request_id)

    def resume(self, request_id: str) -> None:
        with self.lock:
            self.scheduler.paused.discard(request_id)

    def abort(self, request_id: str) -> None:
        """End a request (its caller left); takes effect at the next step, without an output."""
        with self.lock:
            self._aborted.add(request_id)

    def step(self) -> list[StepOutput]:
        """One iteration: schedule -> prepare inputs -> run model -> sample -> postprocess."""
        started = time.perf_counter()
        ended, outputs = self._end_aborted_and_expired()
        batch = self._schedule()
        sampling = [w for w in batch.rows if w.samples]
        if batch.rows:
            logits = self.runner.forward([self._forward_row(w) for w in batch.rows])
            outputs += self._sample([w.request for w in sampling], [w.slot for w in sampling], logits)
        finished = [w.request for w in sampling if w.request.is_finished]
        self._retire(finished)
        if self.on_step is not None and (batch.rows or ended):
            now = time.monotonic()
            done = tuple(finished_request(r, now) for r in finished + ended)
            num_prefill = batch.num_rows - batch.num_decode
            self.on_step(
                StepStats(batch.num_decode, num_prefill, len(sampling), time.perf_counter() - started, done)
            )
        return outputs

    def _schedule(self) -> ScheduledBatch[Request]:
        with self.lock:
            batch = self.scheduler.schedule()
        self._move_slots(batch.moves)  # preempted rows left holes
        self.kv.write_pending()  # prefixes newly placed in the pool for the admitted rows
        now = time.monotonic()
        for request in batch.admitted:  # fresh, or resumed after a preemption: the row starts anew
            if request.admitted_time is None:
                request.admitted_time = now
            if request.params.has_penalties:
                self.penalties.load(self.scheduler.slot_of(request), request.prompt_ids, request.output_ids)
        return batch

    def _move_slots(self, moves: list[SlotMove]) -> None:
        """Apply compaction moves to penalised rows' token histories (KV blocks stay where they are)."""
        if not moves:
            return
        with self.lock:
            running = {r.request_id: r for r in self.scheduler.running}
        for move in moves:
            if running[move.request_id].params.has_penalties:
                self.penalties.move(move.src, move.dst)

    def _forward_row(self, work: RowWork[Request]) -> ForwardRow:
        request, start, end = work.request, work.start, work.start + work.num_tokens
        num_prompt = len(request.prompt_ids)
        if start >= num_prompt:  # decoding (or recomputing what it generated): no copy of the prompt
            ids = request.output_ids[start - num_prompt : end - num_prompt]
        else:
            ids = request.prompt_ids[start:end] + request.output_ids[: max(0, end - num_prompt)]
        pool, row_id = self.kv.pool, request.request_id
        plan = PlanRow(pool.prefix_of(row_id), pool.table(row_id), start, work.num_tokens)
        return ForwardRow(plan, ids, work.samples)

    def _sample(self, rows: list[Request], slots: list[int], logits: torch.Tensor) -> list[StepOutput]:
        """Sample every row; a row whose logits are not finite fails alone (the others go on)."""
        is_finite = torch.isfinite(logits).all(dim=-1)
        logits = torch.where(is_finite[:, None], logits, 0.0)
        params = [r.params for r in rows]
        ids = sample(logits, params, [r.generator for r in rows], self.penalties.for_step(params, slots))
        logprobs = token_logprobs(logits, ids, params)
        decode, eos = self.loaded.decode, self.loaded.eos_ids
        outputs = []
        for request, token_id, lp, ok in zip(rows, ids, logprobs, is_finite.tolist(), strict=True):
            if not ok:
                outputs.append(self._fail_row(request, "the model produced non-finite logits for this row"))
                continue
            output = append_token(request, token_id, decode, eos, self.loaded.byte_ids)
            outputs.append(
                output if lp is None else dataclasses.replace(output, logprob=lp[0], top_logprobs=lp[1])
            )
        return outputs

    def _fail_row(self, request: Request, message: str) -> StepOutput:
        log.error("request %s (task %s) failed: %s", request.request_id, request.prefix.meta.task_id, message)
        request.finish_reason = "error"
        return StepOutput(request.request_id, [], "", "error", error=message)

    def _retire(self, finished: list[Request]) -> None:
        if not finished:
            return
        with self.lock:
            moves = self.scheduler.retire({r.request_id for r in finished})
        self._move_slots(moves)

    def _end_aborted_and_expired(self) -> tuple[list[Request], list[StepOutput]]:
        """Drop aborted and expired requests (waiting ones leave the queue, running ones are
        retired); returns the running ones that ended and the timeouts' outputs."""
        now = time.monotonic()
        with self.lock:
            aborted, self._aborted = self._aborted, set()
            for request_id in aborted:
                self.scheduler.remove_waiting(request_id)
            expired = []
            if self.request_timeout_s is not None:
                expired = [r for r in self.scheduler.waiting if r.deadline is not None and r.deadline <= now]
                for request in expired:
                    self.scheduler.remove_waiting(request.request_id)
            ended = [
                r
                for r in self.scheduler.running
                if r.request_id in aborted or (r.deadline is not None and r.deadline <= now)
            ]
        for request in ended:
            request.finish_reason = "abort" if request.request_id in aborted else "timeout"
        self._retire(ended)
        timeouts = [r for r in expired + ended if r.finish_reason == "timeout" or r in expired]
        message = f"the request ran past the server's request timeout ({self.request_timeout_s} s)"
        for request in timeouts:
            request.finish_reason = "timeout"
        return ended, [StepOutput(r.request_id, [], "", "timeout", error=message) for r in timeouts]

    def fail_all(
        self, message: str, include_waiting: bool, reason: FinishReason = "error"
    ) -> list[StepOutput]:
        """End the running rows (and the waiting ones when shutting down) with an error."""
        with self.lock:
            victims = list(self.scheduler.running)
            self.scheduler.retire({r.request_id for r in victims})
            if include_waiting:
                victims += self.scheduler.waiting
                self.scheduler.waiting.clear()
        for request in victims:
            request.finish_reason = reason
        return [StepOutput(r.request_id, [], "", reason, error=message) for r in victims]
