"""The step loop: schedule -> prepare inputs -> run model -> sample -> postprocess.

Model compute runs on one dedicated thread; callers on the asyncio loop submit requests
and read `StepOutput`s from a per-request handle. The loop never touches Redis: a request
arrives here with its prefix already resident.
"""

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from prefix_store.entry import PrefixEntry, PrefixSource
from prefix_store.errors import InvalidPrefix
from server.engine.errors import ContextTooLong, EngineStopped, InvalidInput, QueueFull
from server.engine.handle import RequestHandle
from server.engine.kv_cache import SlotKVCache
from server.engine.model_loader import LoadedModel
from server.engine.model_runner import ForwardRow, ModelRunner
from server.engine.postprocess import append_token
from server.engine.prefix_encoder import compute_prefix_kv
from server.engine.request import FinishReason, Request, SamplingParams, StepOutput
from server.engine.sampler import make_generator, sample, token_logprobs
from server.engine.scheduler import Scheduler, prefill_groups
from server.engine.stats import EngineStats, StepStats, finished_request

log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine:
    """Continuous batching over a slot KV cache; one prefix per row."""

    def __init__(
        self,
        loaded: LoadedModel,
        kv: SlotKVCache,
        max_queue: int,
        on_step: Callable[[StepStats], None] | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.loaded = loaded
        self.kv = kv
        self.max_len = kv.layout.max_len
        self.runner = ModelRunner(loaded.model, kv, loaded.max_positions)
        self.scheduler: Scheduler[Request] = Scheduler(
            kv.layout.num_slots,
            max_queue,
            prefill_order=lambda r: len(r.prompt_ids),
            tenant_of=lambda r: r.tenant,
        )
        self.request_timeout_s = request_timeout_s
        self._on_step = on_step
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._aborted: set[str] = set()
        self._handles: dict[str, RequestHandle] = {}  # owned by the event loop thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._jobs: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []  # model work besides steps

    # ---- lifecycle -------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._is_stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        layout = self.kv.layout
        with self._lock:
            running, num_waiting = list(self.scheduler.running), len(self.scheduler.waiting)
        bytes_per_position = layout.bytes_per_slot // layout.max_len
        used = sum(r.num_cached + 1 for r in running) * bytes_per_position
        capacity = layout.bytes_per_slot * layout.num_slots
        return EngineStats(
            len(running), num_waiting, layout.num_slots, self.max_len, self.is_alive, used, capacity
        )

    # ---- caller side (event loop thread) -----------------------------------------------
    def token_text(self, token_id: int) -> str:
        """One token as text (may be partial UTF-8, shown as the decoder shows it)."""
        return self.loaded.decode([token_id])

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON can carry lone surrogates ("\ud800"); text cannot
            raise InvalidInput(f"the prompt is not valid Unicode: {exc.reason} at {exc.start}") from exc
        return list(self.loaded.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def submit(
        self,
        prefix: PrefixEntry,
        prompt_ids: list[int],
        params: SamplingParams,
        on_done: Callable[[], None] | None = None,
        tenant: str | None = None,
    ) -> RequestHandle:
        """Validate and queue a request. Raises InvalidInput, ContextTooLong, QueueFull, EngineStopped.

        `on_done` runs once on the event loop when the request is over (finished, failed, or
        its caller stopped listening); it never runs if `submit` raises. Admission is fair
        across `tenant`s (default: the task's namespace, `acme` for `acme:summarize`).
        """
        self._validate(prefix, prompt_ids, params)
        task_id = prefix.meta.task_id
        request = Request(prefix=prefix, prompt_ids=list(prompt_ids), params=params)
        request.tenant = tenant if tenant is not None else task_id.split(":", 1)[0]
        if self.request_timeout_s is not None:
            request.deadline = request.arrival_time + self.request_timeout_s
        request.generator = make_generator(params, self.kv.layout.device)
        handle = RequestHandle(self, request, on_done)
        with self._wakeup:
            if self._is_stopping or not self.is_alive:
                raise EngineStopped("the engine is not running")
            shed = None
            if not self.scheduler.can_accept():
                shed = self.scheduler.shed_for(request.tenant)  # room for a lighter tenant, if any
                if shed is None:
                    raise QueueFull(f"{len(self.scheduler.waiting)} requests are already waiting")
            self._handles[request.request_id] = handle
            self.scheduler.add(request)
            self._wakeup.notify()
        if shed is not None:
            shed.finish_reason = "shed"
            message = f"the queue is full and tenant {shed.tenant!r} holds the most of it: retry later"
            self._emit([StepOutput(shed.request_id, [], "", "shed", error=message)])
        return handle

    def release(self, handle: RequestHandle) -> None:
        """The caller stopped listening: abort the request if it is still going."""
        self._handles.pop(handle.request_id, None)
        handle._done()
        if not handle.request.is_finished:
            with self._wakeup:
                self._aborted.add(handle.request_id)
                self._wakeup.notify()

    async def run_on_model(self, job: Callable[[], T]) -> T:
        """Run `job` on the engine thread between steps (the model is never used by two threads)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._wakeup:
            if self._is_stopping or not self.is_alive:
                raise EngineStopped("the engine is not running")
            self._jobs.append((job, future))
            self._wakeup.notify()
        return await future

    async def encode_prefix(self, source: PrefixSource) -> torch.Tensor:
        """Turn a soft prompt or a text prompt into a KV prefix `[L, 2, kv_heads, P, head_dim]`."""
        token_ids = None if source.text is None else self.encode(source.text, add_special_tokens=False)
        length = len(token_ids) if token_ids is not None else int(source.embeddings.shape[0])  # type: ignore[union-attr]
        if not 1 <= length < self.max_len:
            raise InvalidPrefix(
                f"a {source.kind} prefix of {length} tokens does not fit: expected 1..{self.max_len - 1}"
            )
        model, device = self.loaded.model, self.loaded.device
        return await self.run_on_model(lambda: compute_prefix_kv(model, device, token_ids, source.embeddings))

    def _validate(self, prefix: PrefixEntry, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidInput("the prompt is empty: send at least one token")
        vocab = self.loaded.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidInput(f"token ids must be in [0, {vocab}): got {bad[:5]}")
        needed = prefix.meta.prefix_len + len(prompt_ids) + params.max_new_tokens
        if needed > self.max_len:
            raise ContextTooLong(
                f"prefix ({prefix.meta.prefix_len}) + prompt ({len(prompt_ids)}) + max_new_tokens "
                f"({params.max_new_tokens}) = {needed} exceeds the context of {self.max_len} positions"
            )

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for output in outputs:
            handle = self._handles.get(output.request_id)
            if handle is not None:
                handle._deliver(output)
                if output.finish_reason is not None:  # even if nobody ever iterates the handle
                    del self._handles[output.request_id]
                    handle._done()

    # ---- engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wakeup:
                while self.scheduler.is_idle and not self._jobs and not self._is_stopping:
                    self._wakeup.wait()
                if self._is_stopping:
                    break
                jobs, self._jobs = self._jobs, []
            for job, future in jobs:
                self._run_job(job, future)
            if self.scheduler.is_idle:
                continue
            try:
                self.step()
            except Exception as exc:  # the loop must survive anything one batch does
                log.exception("engine step failed")
                self._fail(f"engine error: {exc}", include_waiting=False)
        self._fail("the server shut down before the request ended", include_waiting=True, reason="shutdown")
        with self._lock:
            jobs, self._jobs = self._jobs, []
        for _, future in jobs:
            self._settle(future, None, EngineStopped("the server is shutting down"))

    def _run_job(self, job: Callable[[], Any], future: "asyncio.Future[Any]") -> None:
        try:
            result, error = job(), None
        except Exception as exc:  # handed to the caller; the loop goes on
            result, error = None, exc
        self._settle(future, result, error)

    def _settle(self, future: "asyncio.Future[Any]", result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(settle)

    def step(self) -> None:
        """One iteration of continuous batching."""
        started = time.perf_counter()
        expired, timeouts = self._take_expired()
        aborted = self._take_aborted() + expired
        self._retire({r.request_id for r in aborted})
        self._emit(timeouts)  # after retiring: whoever reads the timeout finds the row gone
        with self._lock:
            batch = self.scheduler.schedule()
        for request in batch.prefill:
            request.admitted_time = time.monotonic()
        outputs: list[StepOutput] = []
        if batch.decode:
            rows = [ForwardRow(r.num_cached, [r.output_ids[-1]]) for r in batch.decode]
            outputs += self._sample(batch.decode, self.runner.forward(0, rows))
        if batch.prefill:
            start = batch.prefill_slot_start
            for offset, request in enumerate(batch.prefill):
                self.kv.load_prefix(start + offset, request.prefix.kv)
            # rows arrive sorted by prompt length: forward them in groups with little padding
            for lo, hi in prefill_groups([len(r.prompt_ids) for r in batch.prefill]):
                group = batch.prefill[lo:hi]
                rows = [ForwardRow(r.prefix_len, r.prompt_ids) for r in group]
                outputs += self._sample(group, self.runner.forward(start + lo, rows))
        finished = [r for r in batch.decode + batch.prefill if r.is_finished]
        self._retire({r.request_id for r in finished})
        self._emit(outputs)
        if self._on_step is not None and (batch.num_rows or aborted):
            now = time.monotonic()
            ended = tuple(finished_request(r, now) for r in finished + aborted)
            duration = time.perf_counter() - started
            self._on_step(StepStats(len(batch.decode), len(batch.prefill), batch.num_rows, duration, ended))

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> list[StepOutput]:
        """Sample every row; a row whose logits are not finite fails alone (the others go on)."""
        is_finite = torch.isfinite(logits).all(dim=-1).tolist()  # [rows]
        if not all(is_finite):
            logits = torch.where(torch.tensor(is_finite, device=logits.device)[:, None], logits, 0.0)
        params = [r.params for r in rows]
        ids = sample(logits, params, [r.generator for r in rows])
        logprobs = token_logprobs(logits, ids, params)
        decode, eos = self.loaded.decode, self.loaded.eos_ids
        outputs = []
        for request, token_id, lp, ok in zip(rows, ids, logprobs, is_finite, strict=True):
            if not ok:
                outputs.append(self._fail_row(request, "the model produced non-finite logits for this row"))
                continue
            output = append_token(request, token_id, decode, eos)
            outputs.append(
                output if lp is None else dataclasses.replace(output, logprob=lp[0], top_logprobs=lp[1])
            )
        return outputs

    def _fail_row(self, request: Request, message: str) -> StepOutput:
        log.error("request %s (task %s) failed: %s", request.request_id, request.prefix.meta.task_id, message)
        request.finish_reason = "error"
        return StepOutput(request.request_id, [], "", "error", error=message)

    def _retire(self, finished: set[str]) -> None:
        if not finished:
            return
        with self._lock:
            moves = self.scheduler.retire(finished)
            lengths = {r.request_id: r.num_cached for r in self.scheduler.running}
        for move in moves:
            self.kv.move_slot(move.src, move.dst, lengths[move.request_id])

    def _take_aborted(self) -> list[Request]:
        """Drop aborted waiting requests; mark aborted running rows finished and return them."""
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            for request_id in aborted:
                self.scheduler.remove_waiting(request_id)
            running = [r for r in self.scheduler.running if r.request_id in aborted]
        for request in running:
            request.finish_reason = "abort"
        return running

    def _take_expired(self) -> tuple[list[Request], list[StepOutput]]:
        """End every request past its deadline (waiting ones leave the queue); return the running
        ones (to retire) and the outputs that tell every expired request's caller."""
        if self.request_timeout_s is None:
            return [], []  # no deadlines: nothing to scan
        now = time.monotonic()
        with self._lock:
            expired = [r for r in self.scheduler.waiting if r.deadline is not None and r.deadline <= now]
            for request in expired:
                self.scheduler.remove_waiting(request.request_id)
            running = [r for r in self.scheduler.running if r.deadline is not None and r.deadline <= now]
        message = f"the request ran past the server's request timeout ({self.request_timeout_s} s)"
        for request in expired + running:
            request.finish_reason = "timeout"
        return running, [
            StepOutput(r.request_id, [], "", "timeout", error=message) for r in expired + running
        ]

    def _fail(self, message: str, include_waiting: bool, reason: FinishReason = "error") -> None:
        """End the running rows (and the waiting ones when shutting down) with an error."""
        with self._lock:
            victims = list(self.scheduler.running)
            self.scheduler.running.clear()
            if include_waiting:
                victims += self.scheduler.waiting
                self.scheduler.waiting.clear()
        outputs = []
        for request in victims:
            request.finish_reason = reason
            outputs.append(StepOutput(request.request_id, [], "", reason, error=message))
        self._emit(outputs)

    def _emit(self, outputs: list[StepOutput]) -> None:
        if outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, outputs)
