"""Connections that cannot hold the server hostage: uvicorn's h11 protocol with a deadline on
reading every request (headers, then body at a minimum rate), a cap on connections per client
address as well as in all, and a small reserve of connections for `/health` and `/ready`."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.http_guard import RateLimitedRecords

log = logging.getLogger(__name__)
log.addFilter(RateLimitedRecords(("refused a connection", "closed a connection")))  # no log floods

# Per connection. Linux otherwise grows it up to tcp_wmem's max (4 MiB), which would hide a
# client that stopped reading from --stream-stall-timeout; 256 KiB still streams MB/s at 100 ms RTT.
_SEND_BUFFER_BYTES = 256 * 1024

_BUSY = (  # before any work: a proxy may send it to another replica (X-Prefix-Retry-Safe)
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nX-Prefix-Retry-Safe: 1\r\n"
    b"Connection: close\r\n\r\n"
)
# a reserved connection may carry only these (the request line's start, as sent by probes)
_PROBE_LINES = (b"GET /health ", b"GET /health?", b"GET /ready ", b"GET /ready?")
_MAX_REQUEST_LINE = 64  # bytes read from a reserved connection before it is judged
# A response sent before its request's body was read (a refused credential) is followed by a
# lingering close, as web servers do: the server half-closes, then discards what still comes for
# at most this long / this many bytes, then closes. Closing at once would make the kernel answer
# the body's next bytes with a reset, which can destroy the response before the client reads it.
# A client that sends nothing for `_LINGER_IDLE_S` is done (or trickling): closed then.
_LINGER_S = 1.0
_LINGER_IDLE_S = 0.5
_LINGER_BYTES = 256 * 1024
# A connection over a cap is answered 503 only after this long (x 1 to 1.5): a client that
# reconnects at once when refused then costs the loop one accept per delay, not thousands a second
# (bench/abuse.py queue_fill_n16, ~200 such clients of one address: victim p99 5.3x -> 1.0x of its
# baseline). At most `max_connections` wait at once (fds are cheap; beyond that, refused at once).
_REFUSE_DELAY_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a request may take to arrive, and how many connections may be open.

    `header_timeout_s`: request headers must be complete this long after the connection opened
    (or after the previous response), x 1 to 1.5 (jittered). Then the body must keep arriving at
    `min_body_rate` bytes/s on average over each such window, unless the server is not reading it.
    `max_connections`: in all; `num_reserved` more may carry only `/health` or `/ready`.
    `max_per_client`: per client address; peers in `trusted_proxies` (which carry many clients'
    requests) count only towards `max_connections` (their clients are capped per request, by
    `X-Forwarded-For`: see `server.api.client_cap`). A connection over either cap is answered
    503 after `_REFUSE_DELAY_S` (it counts towards neither cap meanwhile)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1024
    max_per_client: int = 64
    min_body_rate: float = 1024.0
    trusted_proxies: frozenset[str] = frozenset()
    num_reserved: int = 8

    def is_trusted(self, host: str) -> bool:
        """Whether `host` is a trusted proxy (an address, a network like 10.0.0.0/8, or `*`)."""
        entries = self.trusted_proxies
        return "*" in entries or host in entries or _is_in_networks(host, entries)


def _is_in_networks(host: str, entries: frozenset[str]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in entries:
        if "/" in entry:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol class, guarded by `limits` (one set of counters per class)."""
    attributes = {"limits": limits, "num_per_client": Counter(), "refusing": set()}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attributes)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under `limits`; `guarded_protocol` makes the class uvicorn uses."""

    limits: ConnectionLimits
    num_per_client: Counter[str]  # open connections per client address, shared by the class
    refusing: set[GuardedH11Protocol]  # connections over a cap, waiting for their 503 (shared)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._host: str | None = None  # set once counted in `num_per_client`
        self._num_window_bytes = 0  # received since the read timer was armed
        self._window_start = 0.0
        self._is_reserved = False  # beyond --max-connections: for probes only
        self._reserved_head: bytes | None = None  # its request's first bytes, until judged
        self._lingering: _LingeringTransport | None = None
        self._refusal: asyncio.TimerHandle | None = None  # while in `refusing`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a fixed send buffer: a client that stops reading blocks us soon
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)
        num_open = len(self.connections) - len(self.refusing)
        host = self.client[0] if self.client else ""
        if num_open > self.limits.max_connections + self.limits.num_reserved:
            self._refuse_later(transport, f"--max-connections={self.limits.max_connections} reached")
            return
        if not self.limits.is_trusted(host) and self.num_per_client[host] >= self.limits.max_per_client:
            cap = self.limits.max_per_client
            self._refuse_later(transport, f"--max-connections-per-client={cap} reached")
            return
        self.num_per_client[host] += 1
        self._host = host
        self._lingering = _LingeringTransport(transport, lambda: self.conn.their_state is h11.SEND_BODY)
        self.transport = cast(asyncio.Transport, self._lingering)  # what uvicorn closes
        if num_open > self.limits.max_connections:
            self._is_reserved, self._reserved_head = True, b""
        self._arm_read_timer()

    def _refuse_later(self, transport: asyncio.Transport, why: str) -> None:
        """503 after `_REFUSE_DELAY_S` (reading paused meanwhile); at once if too many wait."""
        if len(self.refusing) >= self.limits.max_connections:
            _refuse_busy(transport, why)
            return
        transport.pause_reading()
        self.refusing.add(self)
        delay_s = _REFUSE_DELAY_S * (1 + 0.5 * random.random())
        self._refusal = asyncio.get_running_loop().call_later(delay_s, self._refuse_now, transport, why)

    def _refuse_now(self, transport: asyncio.Transport, why: str) -> None:
        self.refusing.discard(self)
        self._refusal = None
        _refuse_busy(transport, why)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refusal is not None:
            self._refusal.cancel()
            self.refusing.discard(self)
        if self._read_timer is not None:
            self._read_timer.cancel()
        if self._lingering is not None:
            self._lingering.cancel()
        if self._host is not None:
            self.num_per_client[self._host] -= 1
            if self.num_per_client[self._host] <= 0:
                del self.num_per_client[self._host]
            self._host = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None and self._lingering.is_lingering:
            self._lingering.discard(len(data))
            return
        self._num_window_bytes += len(data)
        if self._reserved_head is not None:
            data = self._reserved_head + data
            if not self._is_probe(data):
                return
        super().data_received(data)

    def _is_probe(self, head: bytes) -> bool:
        """A reserved connection: whether its request is a probe (False while undecided: the
        bytes are kept; False when not a probe: 503, closed)."""
        if any(head.startswith(line) for line in _PROBE_LINES):
            self._reserved_head = None
            return True
        if len(head) < _MAX_REQUEST_LINE and any(line.startswith(head) for line in _PROBE_LINES):
            self._reserved_head = head
            return False
        _refuse_busy(self.transport, f"--max-connections={self.limits.max_connections} reached")
        return False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._is_reserved:
            self._reserved_head = b""  # its next request must be a probe too
        if not self.transport.is_closing():
            self._arm_read_timer()

    def _arm_read_timer(self, window_s: float | None = None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        # jittered: a thousand connections opened together must not all be cut (and come
        # back) in the same loop iteration, which would stall every other request at once
        if window_s is None:
            window_s = self.limits.header_timeout_s * (1.0 + 0.5 * random.random())
        self._num_window_bytes, self._window_start = 0, self.loop.time()
        self._read_timer = self.loop.call_later(window_s, self._on_read_deadline)

    def _on_read_deadline(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._reserved_head is not None:  # a reserved connection that sent no probe in time
            _refuse_busy(self.transport, f"--max-connections={self.limits.max_connections} reached")
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # the client has not finished the headers of its next request
            self.transport.close()
        elif state is h11.SEND_BODY:
            self._check_body_rate()
        # else the request has arrived whole: the response's own guards take over

    def _check_body_rate(self) -> None:
        """Mid-body: close if it arrived slower than the minimum rate over the last window
        (not while uvicorn has paused reading because the app has not taken what came)."""
        elapsed = self.loop.time() - self._window_start
        is_waiting = self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue)
        if is_waiting or self._num_window_bytes >= self.limits.min_body_rate * elapsed:
            self._arm_read_timer(self.limits.header_timeout_s)
            return
        log.warning(
            "closed a connection: its request body came slower than --min-body-rate=%g bytes/s",
            self.limits.min_body_rate,
        )
        self.transport.abort()


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: `close()` while the client is still sending
    a body nobody will read becomes a lingering close (see `_LINGER_S`); all else is delegated."""

    def __init__(self, transport: asyncio.Transport, is_mid_body: Callable[[], bool]) -> None:
        self._transport = transport
        self._is_mid_body = is_mid_body
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._num_discarded = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    @property
    def is_lingering(self) -> bool:
        return self._timer is not None

    def is_closing(self) -> bool:
        return self.is_lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_lingering or self._transport.is_closing():
            return
        if not self._is_mid_body() or not self._transport.can_write_eof():
            self._transport.close()
            return
        self._transport.write_eof()  # the response is complete: the client sees it, then end of file
        self._transport.resume_reading()  # (paused by flow control, maybe) so that the rest drains
        self._deadline = asyncio.get_running_loop().time() + _LINGER_S
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
        delay = min(_LINGER_IDLE_S, self._deadline - loop.time())
        self._timer = loop.call_later(max(delay, 0.0), self._transport.close)

    def discard(self, num_bytes: int) -> None:
        """Bytes that came while lingering: dropped unread; past `_LINGER_BYTES`, close now."""
        self._num_discarded += num_bytes
        if self._num_discarded > _LINGER_BYTES:
            self.cancel()
            self._transport.close()
        else:
            self._close_when_idle()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _refuse_busy(transport: asyncio.Transport, why: str) -> None:
    transport.write(_BUSY)
    transport.close()
    log.warning("refused a connection: %s", why)
