"""Throwaway redis-server processes for tests (never the shared Redis on 6379)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from infra.embedded_redis import find_redis_server, free_port, terminate, wait_until_ready


class RedisProcess:
    """A redis-server on a free 127.0.0.1 port; in-memory unless `persistent=True`.

    `restart()` reuses the port, so clients built on `url` keep working afterwards.
    """

    def __init__(self, persistent: bool = False) -> None:
        self._persistent = persistent
        self._dir = Path(tempfile.mkdtemp(prefix="test-redis-"))
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisProcess was never started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisProcess:
        """Start the server (on the previous port after a stop) and wait for PING."""
        if self.is_running:
            return self
        for attempt in range(3):
            port = self._port if self._port is not None else free_port()
            log_path = self._dir / "redis.log"
            persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self._persistent else []
            command = [
                find_redis_server(),
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--daemonize", "no",
                "--dir", str(self._dir),
                "--logfile", str(log_path),
                "--save", "",
                *persistence,
            ]  # fmt: skip
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_until_ready(proc, port, log_path)
            except RuntimeError:
                terminate(proc)
                if self._port is not None or attempt == 2:
                    raise
                continue  # the free port was taken meanwhile: pick another
            self._proc, self._port = proc, port
            return self
        raise AssertionError("unreachable")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL when `kill`, like a crash) and wait until it is gone."""
        if self._proc is None:
            return
        if kill:
            self._proc.kill()
            self._proc.wait()
        else:
            terminate(self._proc)
        self._proc = None

    def restart(self, kill: bool = False) -> RedisProcess:
        """Stop, then start again on the same port."""
        self.stop(kill=kill)
        return self.start()

    def close(self) -> None:
        """Stop and remove the data directory."""
        self.stop(kill=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
