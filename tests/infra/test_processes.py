"""Die-with-parent: a child set up by `infra.processes` ends when its parent is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from infra.processes import die_with_parent_hook

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _is_gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (a container's pid 1 may not reap)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_a_child_of_the_hook_ends_with_its_killed_parent() -> None:
    parent_code = textwrap.dedent(
        """
        import subprocess, sys, time
        from infra.processes import die_with_parent_hook
        child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent_hook())
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, env=ENV)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    try:
        assert not _is_gone(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5.0
        while not _is_gone(child_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _is_gone(child_pid), "the child outlived its SIGKILLed parent"
    finally:
        if not _is_gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_a_running_child_whose_parent_is_already_gone_exits_at_once() -> None:
    code = "from infra.processes import die_with_parent; die_with_parent(-1); print('still here')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=30)
    assert done.returncode == 0 and done.stdout == ""


def test_off_the_main_thread_there_is_no_hook() -> None:
    hooks: list[object] = []
    thread = threading.Thread(target=lambda: hooks.append(die_with_parent_hook()))
    thread.start()
    thread.join()
    assert hooks == [None] and die_with_parent_hook() is not None


def _niceness() -> int:
    return os.nice(0)


def test_a_background_helper_runs_at_a_lower_cpu_priority_than_the_server() -> None:
    """The JSON and tokenizer helpers (one caller's large body or prompt) yield the CPU to the
    server's event loop and engine thread: their niceness is HELPER_NICENESS above the server's."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from infra.processes import HELPER_NICENESS, as_background_helper

    context = multiprocessing.get_context("spawn")
    setup = {"initializer": as_background_helper, "initargs": (os.getpid(),)}
    with ProcessPoolExecutor(1, mp_context=context, **setup) as pool:  # type: ignore[arg-type]
        helper = pool.submit(_niceness).result(timeout=60)
    assert helper == min(19, os.nice(0) + HELPER_NICENESS)
