"""The engine's front door: owns the engine thread that runs `EngineCore.step()` in a loop,
the per-request handles, the queue's admission (engine/admission.py), the text processor and the
bridge to the asyncio event loop.

Callers on the event loop submit requests and read `StepOutput`s from a per-request handle; what
they ask of the core (add, abort, shed, pause, resume) is a message its next step takes in, so
the core needs no lock. The front door's lock guards only its own state: the admission ledger,
the jobs for the model and the engine thread's wake-up.
The loop never touches Redis: a request arrives here with its prefix already resident.
"""

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from prefix_store.entry import PrefixEntry, PrefixSource
from prefix_store.errors import InvalidPrefix
from server.engine.admission import Admission
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.errors import EngineStopped
from server.engine.handle import PAUSE_AT, RequestHandle
from server.engine.kv_cache import PagedKVCache
from server.engine.model_loader import LoadedModel
from server.engine.prefix_encoder import compute_prefix_kv
from server.engine.processor import Processor
from server.engine.request import Request, SamplingParams, StepOutput
from server.engine.sampler import make_generator
from server.engine.stats import EngineStats, StepStats
from server.engine.tokenize import Messages

log = logging.getLogger(__name__)
T = TypeVar("T")
# A stalled engine (rows to run, none runnable) plans again at least this often, should
# something change that no caller announced; between times it sleeps.
_RECHECK_S = 0.5


class Engine:
    """The front door: an engine thread stepping an `EngineCore`, per-request handles on the event loop."""

    def __init__(
        self,
        loaded: LoadedModel,
        kv: PagedKVCache,
        config: EngineConfig,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.kv = kv
        self.max_len = kv.layout.max_len
        self.processor = Processor(loaded, self.max_len)
        self.config = config
        self.core = EngineCore(loaded, kv, config, on_step)
        self._wakeup = threading.Condition(threading.Lock())
        self._admission: Admission[Request] = Admission(
            config.max_queue, lambda r: r.tenant, lambda r: r.admitted_time is None and not r.is_finished
        )
        self._stats = self.core.stats()  # published by the engine thread after every step
        self._handles: dict[str, RequestHandle] = {}  # owned by the event loop thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._is_kicked = False  # something changed since the last step (under the lock)
        self._is_stalled = False  # the last step could run nothing (every row paused, no room)
        self._jobs: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []  # model work besides steps

    # ---- lifecycle -------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.processor.close()
        with self._wakeup:
            self._is_stopping = True
            self._kick()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The core's state as of its last step, and whether the engine thread is alive."""
        return dataclasses.replace(self._stats, is_alive=self.is_alive)

    # ---- caller side (event loop thread); text work is the processor's ---------------------
    @property
    def max_token_chars(self) -> int:
        return self.processor.max_token_chars

    def token_text(self, token_id: int) -> str:
        return self.processor.token_text(token_id)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.processor.encode(text, add_special_tokens)

    async def encode_off_loop(
        self, prompts: Sequence[str | list[int]], messages: Messages | None, add_special_tokens: bool
    ) -> list[list[int]]:
        return await self.processor.encode_off_loop(prompts, messages, add_special_tokens)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.processor.render_chat(messages)

    def has_room(self, num_requests: int, task_id: str, tenant: str | None = None) -> bool:
        """Whether `submit` would queue `num_requests` more requests of this tenant now (asked before
        any work for them is done; a request submitted meanwhile can still take the room)."""
        with self._wakeup:
            return self._admission.can_take(tenant_of(task_id, tenant), num_requests)

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
        self.processor.validate(prefix, prompt_ids, params)
        task_id = prefix.meta.task_id
        request = Request(prefix=prefix, prompt_ids=list(prompt_ids), params=params)
        request.tenant = tenant_of(task_id, tenant)
        if self.config.request_timeout_s is not None:
            request.deadline = request.arrival_time + self.config.request_timeout_s
        request.generator = make_generator(params, self.kv.layout.device)
        handle = RequestHandle(self, request, on_done)
        with self._wakeup:
            if self._is_stopping or not self.is_alive:
                raise EngineStopped("the engine is not running")
            shed = self._admission.add(request)  # raises QueueFull
            if shed is not None:  # its output comes from the core, once it leaves the queue
                message = f"the queue is full and tenant {shed.tenant!r} holds the most of it: retry later"
                self.core.shed(shed.request_id, message)
            self.core.add(request)
            self._handles[request.request_id] = handle
            self._kick()
        return handle

    def release(self, handle: RequestHandle) -> None:
        """The caller stopped listening: abort the request if it is still going."""
        self._handles.pop(handle.request_id, None)
        handle._done()
        if not handle.request.is_finished:
            with self._wakeup:
                self._admission.remove(handle.request_id)
                self.core.abort(handle.request_id)
                self._kick()

    def resume(self, handle: RequestHandle) -> None:
        """The reader caught up: its row decodes again."""
        handle.is_paused = False
        with self._wakeup:
            self.core.resume(handle.request_id)
            self._kick()

    async def run_on_model(self, job: Callable[[], T]) -> T:
        """Run `job` on the engine thread between steps (the model is never used by two threads)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._wakeup:
            if self._is_stopping or not self.is_alive:
                raise EngineStopped("the engine is not running")
            self._jobs.append((job, future))
            self._kick()
        return await future

    async def encode_prefix(self, source: PrefixSource) -> torch.Tensor:
        """Turn a soft prompt or a text prompt into a KV prefix `[L, 2, kv_heads, P, head_dim]`.
        A prefix leaves room for a one-token prompt and one generated token; a text longer than
        that many of the tokenizer's longest tokens is refused before tokenizing, and tokenizing
        runs in a thread (never on the event loop)."""
        max_prefix_len = self.max_len - 2
        token_ids = None
        if source.text is not None:
            token_ids = await asyncio.to_thread(
                self.processor.encode_prefix_text, source.text, max_prefix_len
            )
        length = len(token_ids) if token_ids is not None else int(source.embeddings.shape[0])  # type: ignore[union-attr]
        if not 1 <= length <= max_prefix_len:
            raise InvalidPrefix(
                f"a {source.kind} prefix of {length} tokens does not fit: expected 1..{max_prefix_len} "
                f"(a {self.max_len}-position context keeps room for a prompt token and one more)"
            )
        model, device = self.loaded.model, self.loaded.device
        return await self.run_on_model(lambda: compute_prefix_kv(model, device, token_ids, source.embeddings))

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for output in outputs:
            handle = self._handles.get(output.request_id)
            if handle is not None:
                handle._deliver(output)
                if output.finish_reason is None and not handle.is_paused and handle.num_unread >= PAUSE_AT:
                    handle.is_paused = True
                    self.core.pause(output.request_id)  # less work: no need to wake the engine thread
                if output.finish_reason is not None:  # even if nobody ever iterates the handle
                    del self._handles[output.request_id]
                    handle._done()

    # ---- engine thread ------------------------------------------------------------------
    def _kick(self) -> None:
        """Under the lock: the engine thread has something new to look at."""
        self._is_kicked = True
        self._wakeup.notify()

    def _wait_for_work(self) -> None:
        """Under the lock: sleep while there is nothing to compute (idle, or the last step could
        run nothing: every running row paused and no room for a waiting one) and nothing changed
        since; wake when a caller kicks, when the earliest deadline passes (so requests time out
        even then), or after `_RECHECK_S` while it holds requests. A stalled engine never spins."""
        while not (self._is_kicked or self._jobs or self._is_stopping):
            if not self.core.is_idle and not self._is_stalled:
                return
            requests = (*self.core.scheduler.waiting, *self.core.scheduler.running)
            deadlines = [r.deadline - time.monotonic() for r in requests if r.deadline is not None]
            timeout = min([*deadlines, _RECHECK_S]) if requests else None
            if timeout is not None and timeout <= 0:
                return
            self._wakeup.wait(timeout)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                self._wait_for_work()
                if self._is_stopping:
                    break
                jobs, self._jobs = self._jobs, []
                self._is_kicked = False
            for job, future in jobs:
                self._run_job(job, future)
            try:
                self.step()
            except Exception as exc:  # the loop must survive anything one batch does
                log.exception("engine step failed")
                self._is_stalled = False  # the failed rows' slots are free: look again
                self._emit(self.core.fail_all(f"engine error: {exc}", include_waiting=False))
                self._stats = self.core.stats()
        message = "the server shut down before the request ended"
        self._emit(self.core.fail_all(message, include_waiting=True, reason="shutdown"))
        self._stats = self.core.stats()
        with self._wakeup:
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
        """One iteration of the core; its outputs go to the handles on the event loop."""
        outputs = self.core.step()
        self._is_stalled = not outputs and self.core.scheduler.num_last_rows == 0
        self._stats = self.core.stats()
        self._emit(outputs)

    def _emit(self, outputs: list[StepOutput]) -> None:
        if outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, outputs)


def tenant_of(task_id: str, tenant: str | None) -> str:
    """The scheduler's fairness unit: the caller's tenant, else the task's namespace (`acme` for
    `acme:summarize`)."""
    return tenant if tenant is not None else task_id.split(":", 1)[0]
