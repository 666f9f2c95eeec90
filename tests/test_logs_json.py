"""`--log-format json` means every line the process writes is JSON; a generated admin token is
never written to a log: it is saved under the data dir (0600) and shown only on a terminal."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server import logs
from tests.server_process import ServerProcess, clean_env


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_logging changes process-wide state: put it back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(logs, "_json_mode", False)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _announce(monkeypatch: pytest.MonkeyPatch, log_format: str, stdout: io.StringIO) -> tuple[str, str]:
    """(stdout, stderr) of announcing a new admin token under `log_format`."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    logs.setup_logging("info", log_format)
    logs.announce_admin_token("s3cret-token", True, Path("/data/admin_token"), is_given=False)
    return stdout.getvalue(), stderr.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_a_new_token_is_shown_on_a_terminal_in_text_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = _announce(monkeypatch, "text", _Terminal())
    assert out == "prefix-serve: admin token s3cret-token (saved in /data/admin_token)\n" and err == ""


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_new_token_is_never_written_to_a_pipe_or_a_log(
    monkeypatch: pytest.MonkeyPatch, log_format: str
) -> None:
    for stdout in (io.StringIO(), _Terminal()) if log_format == "json" else (io.StringIO(),):
        out, err = _announce(monkeypatch, log_format, stdout)
        assert "s3cret-token" not in out + err
        assert "new admin token saved in /data/admin_token" in out + err
        if log_format == "json":
            assert out == "" and json.loads(err)["logger"] == logs.CONSOLE_LOGGER


def test_json_mode_writes_only_json_lines_from_start_to_exit(gpt2_dir: Path, tmp_path: Path) -> None:
    """A whole life: start-up (generated token), a generation, a warning, SIGTERM, the drain, exit."""
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir, "--model", str(gpt2_dir), "--log-format", "json")
    with server:
        token = server.admin_token
        answer = httpx.post(
            server.url + "/v1/completions", json={"model": "none:x", "prompt": "Hi"}, timeout=30
        )
        assert answer.status_code == 404
    lines = server.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    messages = " | ".join(r["message"] for r in records)
    assert f"listening on http://127.0.0.1:{server.port}" in messages
    assert f"new admin token saved in {data_dir / 'admin_token'}" in messages
    assert "DEVELOPMENT MODE" in messages and messages.count("DEVELOPMENT MODE") == 1  # logged once
    assert token not in "\n".join(lines)
    assert (data_dir / "admin_token").stat().st_mode & 0o777 == 0o600
    assert any(r["logger"] == "prefix_server.access" for r in records)


def test_json_mode_start_up_errors_are_one_json_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(Path(sys.executable).parent / "prefix-serve"), "--port", str(port), "--log-format", "json"],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "error" and f"cannot listen on 127.0.0.1:{port}" in record["message"]


def test_json_mode_uncaught_exceptions_and_warnings_are_json(tmp_path: Path) -> None:
    script = (
        "import warnings, threading\n"
        "from server.logs import setup_logging\n"
        "setup_logging('info', 'json')\n"
        "warnings.warn('a library warning')\n"
        "t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join()\n"
        "raise RuntimeError('boom')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    records = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
    assert [r["logger"] for r in records] == ["py.warnings", "prefix_server", "prefix_server"]
    assert "ZeroDivisionError" in records[1]["exception"] and "RuntimeError: boom" in records[2]["exception"]
