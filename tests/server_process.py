"""Run `python -m server` as a real child process on a free port, for HTTP tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from infra.embedded_redis import free_port

ROOT = Path(__file__).resolve().parents[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the server's own settings (a user's shell has none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_") and k != "REDIS_URL"}
    env.update({"PREFIX_SERVE_DEVICE": "cpu", "PYTHONUNBUFFERED": "1", **(extra or {})})
    return env


class ServerProcess:
    """`prefix-serve` with the given flags; `start()` waits until `/ready` answers 200."""

    def __init__(
        self, data_dir: Path, *flags: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.data_dir = data_dir
        self.flags = list(flags)
        self.env = env or {}
        self.cwd = cwd
        self.port = free_port()
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def with_defaults(cls, cwd: Path, env: dict[str, str] | None = None) -> ServerProcess:
        """`prefix-serve --port <free>` run in `cwd` as the README does: every other flag at its
        default (so the data dir is the relative `./data`)."""
        return cls(cwd / "data", env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin_token").read_text().strip()

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def start(self, timeout_s: float = 90.0) -> ServerProcess:
        if self.cwd is None:
            command = [
                sys.executable,
                "-m",
                "server",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ]
        else:
            command = [str(Path(sys.executable).parent / "prefix-serve"), "--port", str(self.port)]
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            command + self.flags, cwd=self.cwd or ROOT, env=clean_env(self.env), stdout=log, stderr=log
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def terminate(self) -> None:
        """SIGTERM without waiting: the server drains, then exits (see `wait`)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        """The exit status once the process has ended (raises on timeout)."""
        assert self._proc is not None
        return self._proc.wait(timeout=timeout_s)

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def upload_adapter(
    client: httpx.Client, server: ServerProcess, task_id: str, weights: bytes, config: bytes | None
):  # type: ignore[no-untyped-def]
    """PUT a prefix through the admin API (multipart); returns the response."""
    files = {"weights": ("adapter_model.safetensors", weights, "application/octet-stream")}
    if config is not None:
        files["config"] = ("adapter_config.json", config, "application/json")
    return client.put(f"{server.url}/admin/prefixes/{task_id}", files=files, headers=server.admin_headers)


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled sample `name` in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
