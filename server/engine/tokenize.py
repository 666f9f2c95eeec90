"""Prompt text to token ids: chat rendering and encoding, on the caller's thread for small work
and elsewhere for large work. A fast (Rust) tokenizer releases the GIL while it encodes, so a
thread is enough for it; a Python tokenizer, and a chat template (Jinja, Python too), hold the
GIL in any thread of this process and would slow every request the event loop serves, so their
large work runs in a helper process (started on first use, one worker: large prompts queue
behind each other, not in front of everyone else)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from infra.processes import as_background_helper
from server.engine.chat import render_chat
from server.engine.errors import InvalidInput

Messages = list[dict[str, str]]


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON can carry lone surrogates ("\ud800"); text cannot
        raise InvalidInput(f"the prompt is not valid Unicode: {exc.reason} at {exc.start}") from exc
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def prepare(
    tokenizer: Any, prompts: Sequence[str | list[int]], messages: Messages | None, add_special_tokens: bool
) -> list[list[int]]:
    """Token ids of each prompt (ids pass as they are), or of the one prompt `messages` render to."""
    texts = prompts if messages is None else [render_chat(tokenizer, messages)]
    return [encode_text(tokenizer, p, add_special_tokens) if isinstance(p, str) else list(p) for p in texts]


_tokenizer: Any = None  # the helper process's copy


def _install(tokenizer: Any, server_pid: int) -> None:
    """In the helper: its tokenizer; a lower CPU priority than the server's serving threads (a
    caller's large prompt must not take CPU time from everyone's steps); it ends with the server."""
    global _tokenizer
    _tokenizer = tokenizer
    as_background_helper(server_pid)


def _prepare_in_helper(
    prompts: Sequence[str | list[int]], messages: Messages | None, add_special_tokens: bool
) -> list[list[int]]:
    return prepare(_tokenizer, prompts, messages, add_special_tokens)


def _is_installed() -> bool:
    return _tokenizer is not None


class OffLoopTokenizer:
    """Large rendering and tokenizing, away from the event loop and from this process's GIL. The
    helper process starts on the first large Python work (importing the tokenizer takes it seconds);
    until it is ready, that work runs in a thread, as it does if the helper cannot start."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pool: ProcessPoolExecutor | None = None
        self._ready: Future[bool] | None = None

    def needs_process(self, has_messages: bool) -> bool:
        return has_messages or not getattr(self.tokenizer, "is_fast", False)

    @property
    def is_ready(self) -> bool:
        """The helper process has its tokenizer."""
        ready = self._ready
        return ready is not None and ready.done() and ready.exception() is None

    def _helper(self) -> ProcessPoolExecutor | None:
        """The helper process once it is ready (started by the first call), else None."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),  # never fork a process with threads
                initializer=_install,
                initargs=(self.tokenizer, os.getpid()),
            )
            self._ready = self._pool.submit(_is_installed)
        return self._pool if self.is_ready else None

    async def prepare(
        self, prompts: Sequence[str | list[int]], messages: Messages | None, add_special_tokens: bool
    ) -> list[list[int]]:
        """As `prepare`, in the helper process (Python work, once it is ready) or in a thread."""
        pool = self._helper() if self.needs_process(messages is not None) else None
        if pool is not None:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(
                    pool, _prepare_in_helper, list(prompts), messages, add_special_tokens
                )
            except BrokenProcessPool:  # the helper died (killed, out of memory): a new one next time
                self.close()
        return await asyncio.to_thread(prepare, self.tokenizer, prompts, messages, add_special_tokens)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self._ready = None, None
