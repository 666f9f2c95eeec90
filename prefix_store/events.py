"""Following change events: classic pub/sub (single Redis, Sentinel) or sharded pub/sub (Cluster).

On Cluster each primary gets its own listener (one plain connection, `SSUBSCRIBE` to the
shard channels of the buckets it serves), so a dead primary silences only its own buckets.
A supervisor re-reads the slot map every second and restarts a listener whose node died or
whose channels moved (a failover); `on_subscribed` runs after every (re)subscription, since
messages published while a subscription was down are lost (the caller reconciles there).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio

from prefix_store.replies import as_text

OnEvent = Callable[[str], None]
OnSubscribed = Callable[[], Awaitable[None]]
_MESSAGE_TYPES = ("message", "smessage", b"message", b"smessage")
_NODE_KWARGS = ("username", "password", "credential_provider", "socket_connect_timeout", "socket_keepalive")


async def _pump(pubsub: Any, on_event: OnEvent) -> None:
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None and message.get("type") in _MESSAGE_TYPES:
            on_event(as_text(message["data"]))


async def listen_classic(
    client: redis.asyncio.Redis, channels: Sequence[str], on_event: OnEvent, on_subscribed: OnSubscribed
) -> None:
    """Subscribe once and pump messages until a Redis error (raised to the caller, who retries)."""
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(*channels)
        await on_subscribed()
        await _pump(pubsub, on_event)
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()


def _node_client(node: Any) -> redis.asyncio.Redis:
    """A plain client for one cluster node, with the cluster's credentials and TLS."""
    kwargs = {k: v for k, v in node.connection_kwargs.items() if k in _NODE_KWARGS or k.startswith("ssl_")}
    pool = redis.asyncio.ConnectionPool(
        connection_class=node.connection_class, host=node.host, port=node.port, max_connections=2, **kwargs
    )
    return redis.asyncio.Redis.from_pool(pool)


async def _listen_node(
    node: Any,
    channels: tuple[str, ...],
    on_event: OnEvent,
    on_subscribed: OnSubscribed,
    on_error: Callable[[], None],
) -> None:
    client = _node_client(node)
    pubsub = client.pubsub()
    try:
        for channel in channels:  # one SSUBSCRIBE per slot: several channels must share one
            await pubsub.ssubscribe(channel)
        await on_subscribed()
        await _pump(pubsub, on_event)
    except Exception:
        on_error()  # the supervisor restarts this listener within a second
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
        with contextlib.suppress(Exception):
            await client.aclose()


def _channels_by_node(cluster: Any, channels: Sequence[str]) -> dict[str, tuple[Any, tuple[str, ...]]]:
    groups: dict[str, tuple[Any, list[str]]] = {}
    for channel in channels:
        node = cluster.get_node_from_key(channel)
        groups.setdefault(node.name, (node, []))[1].append(channel)
    return {name: (node, tuple(chans)) for name, (node, chans) in groups.items()}


async def listen_sharded(
    cluster: Any,
    channels: Sequence[str],
    on_event: OnEvent,
    on_subscribed: OnSubscribed,
    on_error: Callable[[], None],
) -> None:
    """Forever: one shard-channel listener per primary, kept in step with the slot map."""
    running: dict[str, tuple[tuple[str, ...], asyncio.Future[None]]] = {}
    try:
        while True:
            try:
                await cluster.initialize()
                groups = _channels_by_node(cluster, channels)
            except Exception:
                on_error()
                groups = None
            for name, (node, chans) in (groups or {}).items():
                current = running.get(name)
                if current is None or current[0] != chans or current[1].done():
                    if current is not None:
                        current[1].cancel()
                    task: asyncio.Future[None] = asyncio.ensure_future(
                        _listen_node(node, chans, on_event, on_subscribed, on_error)
                    )
                    running[name] = (chans, task)
            for name in set(running) - set(groups or running):
                running.pop(name)[1].cancel()
            await asyncio.sleep(1.0)
    finally:
        for _, task in running.values():
            task.cancel()
