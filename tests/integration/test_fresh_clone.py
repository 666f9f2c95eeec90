"""The product run the way the README runs it: default flags, a relative `./data`, a fresh
working directory, `make serve` from a clean clone; and start-up mistakes fail fast in one line."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import safetensors.torch
import torch

from infra.embedded_redis import free_port
from tests.integration.test_defaults import _redis_pids_for
from tests.server_process import ROOT, ServerProcess, clean_env

_PREFIX = safetensors.torch.save(
    {"prefix": torch.randn(4, 2, 4, 6, 32, generator=torch.Generator().manual_seed(0))}
)


def _generate(url: str) -> httpx.Response:
    body = {"task_id": "demo:hello", "prompt": "Hi", "max_new_tokens": 8}
    return httpx.post(url + "/generate", json=body, timeout=30)


def _children_running(parent: int, marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and marker in (entry / "cmdline").read_text(errors="replace"):
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_default_flags_in_a_fresh_cwd_serve_and_survive_a_restart(tmp_path: Path) -> None:
    with ServerProcess.with_defaults(tmp_path) as server:
        assert (tmp_path / "data" / "redis" / "appendonly.aof").exists() or (
            tmp_path / "data" / "redis" / "appendonlydir"
        ).exists()
        put = httpx.put(
            server.url + "/admin/prefixes/demo:hello",
            files={"weights": ("p.safetensors", _PREFIX, "application/octet-stream")},
            headers=server.admin_headers,
            timeout=30,
        )
        assert put.status_code == 201, put.text
        first = _generate(server.url)
        assert first.status_code == 200, first.text
        helpers = _children_running(server.pid, "spawn_main")
        assert len(helpers) == 1  # the JSON helper process
    assert all(not Path(f"/proc/{pid}").exists() for pid in helpers)  # gone with the server
    with ServerProcess.with_defaults(tmp_path) as again:
        second = _generate(again.url)
        assert second.status_code == 200, second.text
        assert second.json()["token_ids"] == first.json()["token_ids"]
        assert second.json()["prefix_version"] == 1


def _clone(tmp_path: Path) -> Path:
    """A `git clone` of this checkout, sharing its .venv by symlink (kept up to date, not rebuilt)."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    (repo / ".venv").symlink_to(ROOT / ".venv")
    stamp = (ROOT / ".venv" / ".installed").stat().st_mtime
    os.utime(repo / "pyproject.toml", (stamp - 60, stamp - 60))  # make's install step stays a no-op
    return repo


def _copy_terminal(master: int, log_path: Path) -> None:
    """Append what the program writes to its terminal to `log_path`, until it closes."""
    with log_path.open("ab") as log:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not chunk:
                return
            log.write(chunk)
            log.flush()


def test_make_serve_from_a_clean_clone_prints_url_and_token(tmp_path: Path) -> None:
    """In a terminal, as the README runs it: the new admin token is shown (never in a log file)."""
    repo = _clone(tmp_path)
    port = free_port()
    log_path = tmp_path / "make-serve.log"
    log_path.touch()
    env = clean_env({"PYTHONPATH": str(repo)})  # the clone's code, not this checkout's
    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        ["make", "serve", f"ARGS=--port {port}"], cwd=repo, env=env, stdin=subprocess.DEVNULL,
        stdout=terminal, stderr=terminal, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    reader = threading.Thread(target=_copy_terminal, args=(master, log_path), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while "admin token" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "no admin token printed within 60 s"
            time.sleep(0.2)
        text = log_path.read_text(errors="replace")
        assert f"listening on http://127.0.0.1:{port}" in text
        token = re.search(r"admin token (\S+)", text).group(1)  # type: ignore[union-attr]
        assert (repo / "data" / "admin_token").read_text().strip() == token
        listed = httpx.get(
            f"http://127.0.0.1:{port}/admin/prefixes",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert listed.status_code == 200, listed.text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(10)
        os.close(master)


def _serve_fails(cwd: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "prefix-serve"), *flags],
        cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_a_taken_port_fails_at_once_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve_fails(tmp_path, "--port", str(port))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line, no traceback
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert not (tmp_path / "data" / "redis").exists()  # checked before the model or Redis start
    assert not (tmp_path / "data" / "models").exists()
    assert _redis_pids_for(port) == []


def test_an_unusable_data_dir_fails_at_once_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    done = _serve_fails(tmp_path, "--port", str(free_port()), "--data-dir", "a-file/data")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert f"data dir {tmp_path / 'a-file' / 'data'} is not usable" in done.stderr
    assert "--data-dir" in done.stderr
