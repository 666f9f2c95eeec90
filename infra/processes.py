"""Child processes that end with their parent: the kernel SIGTERMs them when it dies, even by SIGKILL.

Stdlib only: a spawned helper process imports this before anything else.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    """libc's `prctl`, or None off Linux (or where libc cannot be loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def die_with_parent_hook() -> Callable[[], object] | None:
    """A `preexec_fn` (runs in the child between fork and exec) that sets die-with-parent; None off
    Linux and off the main thread: PR_SET_PDEATHSIG fires when the *thread* that forked exits,
    which for a worker thread could be long before the process does.

    libc is looked up here, in the parent: the child between fork and exec should do as little as it can.
    """
    prctl = _prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    return functools.partial(prctl, _PR_SET_PDEATHSIG, signal.SIGTERM)


# How much lower than the server's the helpers' CPU priority is (`nice` adds it): their work is one
# caller's large body or prompt, and on a machine with few cores it must not take CPU time from
# the event loop and the engine thread, which every caller shares.
HELPER_NICENESS = 10


def as_background_helper(parent_pid: int) -> None:
    """In a spawned helper of the server (a pool worker's initializer): lower priority than the
    server's serving threads, and end with the server (`die_with_parent`)."""
    try:
        os.nice(HELPER_NICENESS)
    except OSError:  # not permitted here: the helper runs at the server's priority
        pass
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int) -> None:
    """Called in a child that is already running (e.g. a spawned pool worker's initializer): the
    same, and exit at once if `parent_pid` died before the kernel was told."""
    prctl = _prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # not `getppid() == 1`: in a container the parent may itself be pid 1
    if os.getppid() != parent_pid:
        os._exit(0)
