"""One connection factory for every Redis user (prefix store, API keys, rate limits).

`--redis-url` forms:

- `redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS), `unix:///path?db=N`:
  one server, handled by redis-py's own URL parser (query options included).
- `redis+sentinel://[[user]:password@]h1[:26379],h2[:26379]/<service>[/db]` (`rediss+sentinel`
  for TLS): the current primary of `<service>` as the sentinels name it. Every new connection
  asks them, so a failover is followed without a restart (calls fail with 503 until it is done).
- `redis+cluster://[[user]:password@]h1[:6379],h2[:6379]` (`rediss+cluster`): a Redis
  Cluster; the listed nodes are only where the slot map is first read.

The user/password in the URL authenticate to the data nodes. Query options for the two new
forms: `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs` (none|optional|required),
`ssl_check_hostname` (true|false), and for sentinels, which often have their own credentials,
`sentinel_username` / `sentinel_password`. Anything else is refused (a typo must not be ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff

RedisClient = redis.asyncio.Redis | RedisCluster
Kind = Literal["single", "sentinel", "cluster"]

_DEFAULT_PORTS = {"sentinel": 26379, "cluster": 6379}
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed `--redis-url`."""

    kind: Kind
    url: str  # as given (single: handed to redis-py as is)
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels or cluster seed nodes
    service: str | None = None  # sentinel: the monitored primary's name
    db: int = 0
    username: str | None = None
    password: str | None = None
    is_tls: bool = False
    options: dict[str, str] = field(default_factory=dict)  # the query options above


def parse_redis_url(url: str) -> RedisTarget:
    """Parse any accepted form; a clear `ValueError` for everything else."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"redis URL {redact(url)!r} has no scheme (redis://, rediss://, unix://, ...)")
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget("single", url, is_tls=scheme == "rediss")
    base, plus, kind = scheme.partition("+")
    if not plus or base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        raise ValueError(
            f"unknown redis URL scheme {scheme!r}: use redis://, rediss://, unix://, "
            "redis+sentinel:// or redis+cluster:// (rediss+... for TLS)"
        )
    parts = urlsplit("x://" + rest)  # netloc/path/query split without urllib's host parsing
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    nodes = tuple(_node(h, _DEFAULT_PORTS[kind], url) for h in hosts.split(","))
    options = _options(parts.query, kind, url)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if kind == "sentinel":
        if not segments or len(segments) > 2:
            raise ValueError(f"{redact(url)!r}: expected redis+sentinel://h1:p1,h2:p2/<service>[/db]")
        service, db = segments[0], _db(segments[1] if len(segments) == 2 else "0", url)
    else:
        if segments not in ([], ["0"]):
            raise ValueError(f"{redact(url)!r}: a Redis Cluster has only database 0 (no path)")
        service, db = None, 0
    parsed_kind: Kind = "sentinel" if kind == "sentinel" else "cluster"
    return RedisTarget(parsed_kind, url, nodes, service, db, username, password, base == "rediss", options)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    if not colon:  # `redis://secret@host`: redis-py reads a lone userinfo as the password too
        return None, unquote(user) or None
    return unquote(user) or None, unquote(password) or None


def _node(text: str, default_port: int, url: str) -> tuple[str, int]:
    if not text:
        raise ValueError(f"{redact(url)!r}: empty host in the host list")
    if text.startswith("["):  # [ipv6]:port
        host, _, tail = text[1:].partition("]")
        port_text = tail.removeprefix(":")
    else:
        host, _, port_text = text.partition(":")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"{redact(url)!r}: bad port in {text!r}") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"{redact(url)!r}: bad host:port {text!r}")
    return host, port


def _db(text: str, url: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{redact(url)!r}: database must be a number, got {text!r}")
    return int(text)


def _options(query: str, kind: str, url: str) -> dict[str, str]:
    allowed = _TLS_OPTIONS + (_SENTINEL_OPTIONS if kind == "sentinel" else ())
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{redact(url)!r}: unknown option(s) {unknown}; allowed: {list(allowed)}")
    return options


def redact(url: str) -> str:
    """The URL with its password replaced by `***` (for logs and error messages)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, tail = rest.partition("@")
    if not sep or not at or "/" in userinfo:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user + ':' if colon else ''}***@{tail}"


def _common_kwargs() -> dict[str, Any]:
    """Timeouts fit for payloads up to 64 MiB; few short retries, so with Redis down a request
    fails fast (503) instead of stalling. `socket_timeout` bounds each read, not a transfer."""
    return {
        "decode_responses": False,
        "socket_connect_timeout": 2.0,
        "socket_timeout": 10.0,
        "socket_keepalive": True,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2),
    }


class _CommandTableOnce(AsyncCommandsParser):
    """redis-py re-reads the COMMAND table from the default node at every topology refresh; when
    that node is a dead primary, every refresh fails and closes the connections to the live ones
    too, so nothing works until it is back. The table does not change: read it once."""

    __slots__ = ()

    async def initialize(self, node: Any = None) -> None:
        if node:
            self.node = node
        if not self.commands:
            await super().initialize(node)


def _tls_kwargs(target: RedisTarget) -> dict[str, Any]:
    if not target.is_tls:
        return {}
    tls: dict[str, Any] = {"ssl": True}
    for name in _TLS_OPTIONS:
        if name in target.options:
            value = target.options[name]
            tls[name] = value.lower() in ("1", "true", "yes") if name == "ssl_check_hostname" else value
    return tls


def connect(url: str, max_connections: int = 64) -> RedisClient:
    """A binary-safe async client for any accepted URL (see the module docstring)."""
    target = parse_redis_url(url)
    if target.kind == "single":
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=10.0, health_check_interval=15, **_common_kwargs()
        )  # blocks (up to 10 s) when every connection is busy instead of failing a burst
        return redis.asyncio.Redis.from_pool(pool)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            # per node, and redis-py's cluster pool fails (no waiting) when it runs out: leave room
            max_connections=8 * max_connections,
            require_full_coverage=False,  # a dead primary's slots fail; the others keep serving
            **auth,
            **_common_kwargs(),
            **_tls_kwargs(target),
        )
        cluster.commands_parser = _CommandTableOnce()
        return cluster
    sentinel_kwargs = {
        "socket_connect_timeout": 1.0,
        "socket_timeout": 2.0,
        "username": target.options.get("sentinel_username"),
        "password": target.options.get("sentinel_password"),
        **_tls_kwargs(target),
    }
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)
    assert target.service is not None  # parse_redis_url guarantees it
    client: redis.asyncio.Redis = sentinel.master_for(
        target.service,
        db=target.db,
        health_check_interval=15,
        **auth,
        **_common_kwargs(),
        **_tls_kwargs(target),
    )
    return client


def is_cluster(client: object) -> bool:
    """True for a Redis Cluster client (keys must then share a slot per script)."""
    return isinstance(client, RedisCluster)
