"""Parsing of large or suspicious JSON bodies in a helper process, so no body holds the event loop.

`json.loads` holds the GIL from start to end: a 1 MB body of 340,000 `{}` costs ~50-150 ms on
this class of CPU, during which no other request, thread or stream makes progress, and a thread
cannot help. Small bodies with few brackets (nearly every ordinary request) are parsed inline; a
body over `OFF_LOOP_BYTES`, or with more brackets than any valid request has containers, goes to
one helper process, which parses it and returns the value only if it holds at most
`MAX_CONTAINERS` objects/arrays (else a short reason), so the loop never even unpickles a hostile
structure. This module is what the helper process imports: the standard library and
`infra.processes` only.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from infra.processes import as_background_helper

# Bodies larger than this are parsed in the helper process whatever they hold (the parse time of
# a body grows with its size; one of this size costs the loop little, see docs/benchmarks.md).
OFF_LOOP_BYTES = 64 * 1024
# A valid request holds a few objects plus at most --max-prompts lists of token ids (<= 2048 by
# the schema): more brackets than this in the raw bytes make a body suspicious.
MAX_CONTAINERS = 4096


def loads_json(body: bytes) -> Any:
    """`json.loads` with the collector paused: 340,000 containers would otherwise set off ~500
    collections (2x the parse time). The GIL is held throughout, so nothing else runs meanwhile."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(body)
    finally:
        if was_enabled:
            gc.enable()


def is_suspicious(body: bytes) -> bool:
    """More `[`/`{` bytes than valid requests have containers (a count, not a parse: ~0.1 ms/MB)."""
    return body.count(b"[") + body.count(b"{") > MAX_CONTAINERS


def is_off_loop(body: bytes) -> bool:
    """Whether `body` is parsed in the helper process: by size, and (a deeply nested small body
    would hit the parser's recursion limit) by its count of brackets."""
    return len(body) > OFF_LOOP_BYTES or is_suspicious(body)


def _num_containers_over(value: Any, limit: int) -> bool:
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            continue
        seen += 1
        if seen > limit:
            return True
    return False


def parse_checked(body: bytes) -> tuple[str, Any]:
    """In the helper process: ("ok", value), ("decode", (msg, pos)) or ("too_many", reason)."""
    try:
        value = loads_json(body)
    except json.JSONDecodeError as exc:
        return "decode", (exc.msg, exc.pos)
    except (UnicodeDecodeError, RecursionError) as exc:
        return "decode", (str(exc)[:200], 0)
    if _num_containers_over(value, MAX_CONTAINERS):
        return "too_many", f"the body nests more than {MAX_CONTAINERS} JSON objects/arrays"
    return "ok", value


_pool: ProcessPoolExecutor | None = None


def _init_helper(server_pid: int) -> None:
    """In the helper: the kernel ends it when the server dies, however the server dies (a pool
    worker holds both ends of its task queue, so it would otherwise wait forever), at a lower CPU
    priority than the server's event loop and engine thread."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the server's to handle
    as_background_helper(server_pid)


def pool() -> ProcessPoolExecutor:
    """One helper process (spawned, not forked: the server has threads), started on first use."""
    global _pool
    if _pool is None:
        context = multiprocessing.get_context("spawn")
        _pool = ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=_init_helper, initargs=(os.getpid(),)
        )
    return _pool


def stop_pool() -> None:
    """Stop the helper (idempotent); a later `pool()` starts a new one (e.g. after it crashed)."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None


def unpack(kind: str, payload: Any, body: bytes) -> Any:
    """The value, or a `JSONDecodeError` (FastAPI answers it as the validation error it is)."""
    if kind == "ok":
        return payload
    if kind == "decode":
        msg, pos = payload
        raise json.JSONDecodeError(msg, body[:pos].decode(errors="replace"), pos)
    raise json.JSONDecodeError(payload, "", 0)
