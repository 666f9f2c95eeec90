"""EngineCore: the synchronous step loop (no threads, no asyncio, no lock).

`add(request)`, `abort`, `shed`, `pause`, `resume` only post a message; `step()` first takes in
the messages posted since the last step, in order, then runs schedule -> prepare inputs ->
run model -> sample -> postprocess and returns the `StepOutput`s. Another thread may post while a
step runs (the inbox is a deque: its append and popleft are atomic); everything else is the
stepping thread's alone. Bounding the queue is the front door's (see engine/admission.py).
"""

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.attention_plan import PlanRow
from server.engine.block_pool import RequestBlocks
from server.engine.config import EngineConfig
from server.engine.kv_cache import PagedKVCache
from server.engine.model_loader import LoadedModel
from server.engine.model_runner import ForwardRow, ModelRunner
from server.engine.penalties import PenaltyTable
from server.engine.postprocess import append_token
from server.engine.request import FinishReason, Request, StepOutput
from server.engine.sampler import sample, token_logprobs
from server.engine.scheduler import RowWork, ScheduledBatch, Scheduler, SlotMove
from server.engine.stats import EngineStats, StepStats, finished_request

log = logging.getLogger(__name__)

# a prefill chunk stretches a step holding decode rows to about this many decode steps at most
# (stall-free batching, Sarathi-Serve): long prompts cost the running rows little, by default
MAX_DECODE_STALL = 1.5
# while rows decode, one tenant's prefills together feed at most this many such chunks a step
PREFILL_ROWS_PER_TENANT = 2


@dataclass(frozen=True)
class Add:
    request: Request


@dataclass(frozen=True)
class Abort:
    """End a request, waiting or running, without an output (its caller left)."""

    request_id: str


@dataclass(frozen=True)
class Shed:
    """Drop a request that still waits, with a 'shed' output (a full queue made room for another
    tenant); one already admitted meanwhile runs on."""

    request_id: str
    message: str


@dataclass(frozen=True)
class Pause:
    """Stop decoding a running row (its reader is behind) without giving up its slot."""

    request_id: str


@dataclass(frozen=True)
class Resume:
    request_id: str


Message = Add | Abort | Shed | Pause | Resume


class EngineCore:
    """Continuous batching with mixed prefill/decode steps over the paged KV pool."""

    def __init__(
        self,
        loaded: LoadedModel,
        kv: PagedKVCache,
        config: EngineConfig,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.kv = kv
        self.config = config
        self.runner = ModelRunner(loaded.model, kv, loaded.max_positions)
        self.scheduler: Scheduler[Request] = Scheduler(
            kv.layout.num_slots,
            tenant_of=lambda r: r.tenant,
            num_tokens_of=lambda r: len(r.prompt_ids) + len(r.output_ids),  # a preempted row recomputes
            max_num_tokens=config.max_num_batched_tokens,
            max_rows_per_tenant=config.max_rows_per_tenant,
            blocks=RequestBlocks(kv.pool),
            max_stall=MAX_DECODE_STALL,
            prefill_rows_per_tenant=PREFILL_ROWS_PER_TENANT,
        )
        output_embeddings = loaded.model.get_output_embeddings()
        vocab = output_embeddings.weight.shape[0] if output_embeddings is not None else loaded.vocab_size
        # the penalised rows' token histories (allocated when the first penalised request comes)
        self.penalties = PenaltyTable(kv.layout.num_slots, int(vocab), kv.layout.device)
        self.on_step = on_step
        self._inbox: deque[Message] = deque()
        self._aborted: set[str] = set()

    @property
    def is_idle(self) -> bool:
        """Nothing to step: no message, no pending abort, no waiting request, no unpaused running row."""
        return self.scheduler.is_idle and not self._aborted and not self._inbox

    def add(self, request: Request) -> None:
        """Queue a request (taken in by the next step)."""
        self._inbox.append(Add(request))

    def abort(self, request_id: str) -> None:
        self._inbox.append(Abort(request_id))

    def shed(self, request_id: str, message: str) -> None:
        self._inbox.append(Shed(request_id, message))

    def pause(self, request_id: str) -> None:
        self._inbox.append(Pause(request_id))

    def resume(self, request_id: str) -> None:
        self._inbox.append(Resume(request_id))

    def stats(self) -> EngineStats:
        """A snapshot as of the last step (call it on the stepping thread; `is_alive` is the
        front door's to say)."""
        layout, blocks = self.kv.layout, self.kv.pool.stats()
        used = blocks.num_used_blocks * layout.bytes_per_block
        capacity = blocks.num_blocks * layout.bytes_per_block
        num_running, num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        return EngineStats(
            num_running, num_waiting, layout.num_slots, layout.max_len, True, used, capacity, blocks
        )

    def step(self) -> list[StepOutput]:
        """One iteration: schedule -> prepare inputs -> run model -> sample -> postprocess."""
        started = time.perf_counter()
        outputs = self._take_messages()
        ended, timeouts = self._end_aborted_and_expired()
        outputs += timeouts
        batch = self._schedule()
        sampling = [w for w in batch.rows if w.samples]
        if batch.rows:
            logits = self.runner.forward([self._forward_row(w) for w in batch.rows])
            outputs += self._sample([w.request for w in sampling], [w.slot for w in sampling], logits)
        finished = [w.request for w in sampling if w.request.is_finished]
        self._retire(finished)
        num_fair, num_for_blocks = batch.num_preempted_for_fairness, batch.num_preempted_for_blocks
        if self.on_step is not None and (batch.rows or ended or num_fair or num_for_blocks):
            now = time.monotonic()
            done = tuple(finished_request(r, now) for r in finished + ended)
            num_prefill, duration = batch.num_rows - batch.num_decode, time.perf_counter() - started
            stats = StepStats(
                batch.num_decode, num_prefill, len(sampling), duration, done, num_for_blocks, num_fair
            )
            self.on_step(stats)
        return outputs

    def _take_messages(self) -> list[StepOutput]:
        """Apply the messages posted since the last step, in order; returns the shed ones' outputs."""
        outputs = []
        while self._inbox:
            message = self._inbox.popleft()
            if isinstance(message, Add):
                self.scheduler.add(message.request)
            elif isinstance(message, Abort):
                self._aborted.add(message.request_id)
            elif isinstance(message, Shed):
                shed = self.scheduler.remove_waiting(message.request_id)
                if shed is not None:
                    shed.finish_reason = "shed"
                    outputs.append(StepOutput(shed.request_id, [], "", "shed", error=message.message))
            elif isinstance(message, Pause):
                if any(r.request_id == message.request_id for r in self.scheduler.running):
                    self.scheduler.paused.add(message.request_id)
            else:
                self.scheduler.paused.discard(message.request_id)
        return outputs

    def _schedule(self) -> ScheduledBatch[Request]:
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
        self._move_slots(self.scheduler.retire({r.request_id for r in finished}))

    def _end_aborted_and_expired(self) -> tuple[list[Request], list[StepOutput]]:
        """Drop aborted and expired requests (waiting ones leave the queue, running ones are
        retired); returns the running ones that ended and the timeouts' outputs."""
        now = time.monotonic()
        aborted, self._aborted = self._aborted, set()
        for request_id in aborted:
            self.scheduler.remove_waiting(request_id)
        expired = []
        if self.config.request_timeout_s is not None:
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
        message = f"the request ran past the server's request timeout ({self.config.request_timeout_s} s)"
        for request in timeouts:
            request.finish_reason = "timeout"
        return ended, [StepOutput(r.request_id, [], "", "timeout", error=message) for r in timeouts]

    def fail_all(
        self, message: str, include_waiting: bool, reason: FinishReason = "error"
    ) -> list[StepOutput]:
        """End the running rows (and the waiting ones when shutting down, posted ones included) with
        an error."""
        outputs = self._take_messages()
        victims = list(self.scheduler.running)
        self.scheduler.retire({r.request_id for r in victims})
        if include_waiting:
            victims += self.scheduler.waiting
            self.scheduler.waiting.clear()
        for request in victims:
            request.finish_reason = reason
        return outputs + [StepOutput(r.request_id, [], "", reason, error=message) for r in victims]
