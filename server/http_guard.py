"""What the HTTP server needs before and around uvicorn: a listening socket bound up front (a
taken port is one clear line, not a traceback after the model loaded), the fd limit raised,
and connections that cannot hold the server hostage (header timeout, connection cap, accept
errors logged at a bounded rate)."""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import socket
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# Per connection. Linux otherwise grows it up to tcp_wmem's max (4 MiB), which would hide a
# client that stopped reading from --stream-stall-timeout; 256 KiB still streams MB/s at 100 ms RTT.
_SEND_BUFFER_BYTES = 256 * 1024

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nX-Prefix-Retry-Safe: 1\r\n"
    b"Connection: close\r\n\r\n"
)


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


log.addFilter(RateLimitedRecords(("refused a connection",)))  # an attack must not flood the log


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol, plus: a connection that has not sent complete request headers
    within `header_timeout_s` (x 1 to 1.5, jittered; after connecting, or after its previous
    response) is closed, and connections beyond `max_connections` get a 503 and are closed at once."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None:  # a fixed send buffer: a client that stops reading blocks us soon
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)
            if len(self.connections) > max_connections:
                _refuse_busy(transport, max_connections)
                return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            # jittered: a thousand connections opened together must not all be cut (and come
            # back) in the same loop iteration, which would stall every other request at once
            delay = header_timeout_s * (1.0 + 0.5 * random.random())
            self._header_timer = self.loop.call_later(delay, self._on_header_timeout)

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            # IDLE: the client has not finished the headers of its next request
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def _refuse_busy(transport: asyncio.Transport, max_connections: int) -> None:
    transport.write(_BUSY)
    transport.close()
    log.warning("refused a connection: --max-connections=%d reached", max_connections)
