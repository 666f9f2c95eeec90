"""What the HTTP server needs before and around uvicorn: a listening socket bound up front (a
taken port is one clear line, not a traceback after the model loaded), the fd limit raised, and
accept errors logged at a bounded rate. The guarded connections themselves: `server.http_conn`."""

from __future__ import annotations

import logging
import resource
import socket
import time

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A start-up problem the user fixes by changing a flag; printed as one line."""


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now (before the model or Redis start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is fine
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {host}:{port} ({exc.strerror}); is another server running there? "
            f'pick a free port: make serve ARGS="--port <port>" (or PREFIX_SERVE_PORT)'
        ) from None
    sock.set_inheritable(True)
    return sock


def raise_fd_limit() -> int:
    """Soft open-file limit up to the hard one (every connection is an fd); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            pass
    return soft


class RateLimitedRecords(logging.Filter):
    """Lets through at most one record per `interval_s` whose message starts with one of
    `prefixes` (e.g. asyncio's accept() failures, which otherwise repeat many times a second
    under fd exhaustion), and says how many it held back."""

    def __init__(self, prefixes: tuple[str, ...], interval_s: float = 10.0) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.interval_s = interval_s
        self._last = -float("inf")
        self.num_suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefixes):
            return True
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.num_suppressed += 1
            return False
        self._last = now
        if self.num_suppressed:
            record.msg = f"{record.msg} ({self.num_suppressed} more since the last report)"
            self.num_suppressed = 0
        record.exc_info = None  # the traceback is the same every time
        return True


def install_accept_log_limit() -> None:
    logging.getLogger("asyncio").addFilter(RateLimitedRecords(("socket.accept() out of system resource",)))
