"""KeyStore against a real redis-server: secrets never stored, revocation, outage behaviour."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from prefix_store.errors import StoreUnavailable
from prefix_store.redis_store import connect
from server.tenancy.keys import KeyStore, hash_secret
from tests.redis_server import RedisProcess

T = TypeVar("T")


def run_with_keys(url: str, body: Callable[[KeyStore], Awaitable[T]]) -> T:
    async def scenario() -> T:
        client = connect(url)
        try:
            return await body(KeyStore(client))
        finally:
            await client.aclose()

    return asyncio.run(scenario())


def test_create_lookup_list_revoke(redis_proc: RedisProcess) -> None:
    async def body(keys: KeyStore) -> None:
        await keys.refresh()
        assert keys.is_enabled is False
        key, secret = await keys.create("acme", ("acme:*",), 2.5, 1000)
        assert secret.startswith("pk-") and len(secret) > 40 and keys.is_enabled
        assert await keys.lookup(secret) == key
        assert await keys.lookup(secret + "x") is None
        other, _ = await keys.create("beta", ("beta:x",), 0.0, 0)
        assert [k.id for k in await keys.list()] == [key.id, other.id]
        assert await keys.revoke(key.id) == key
        assert await keys.revoke(key.id) is None
        assert await keys.lookup(secret) is None
        assert [k.id for k in await keys.list()] == [other.id]

    run_with_keys(redis_proc.url, body)


def test_redis_holds_hashes_never_secrets(redis_proc: RedisProcess) -> None:
    async def body(keys: KeyStore) -> tuple[str, list[bytes]]:
        _, secret = await keys.create("gamma", ("*",), 0.0, 0)
        client = connect(redis_proc.url)
        try:
            dump = [await client.dump(k) or b"" async for k in client.scan_iter("pfx:apikey*")]
            dump += [k async for k in client.scan_iter("pfx:apikey*")]
        finally:
            await client.aclose()
        return secret, dump

    secret, dump = run_with_keys(redis_proc.url, body)
    assert any(hash_secret(secret).encode() in d for d in dump)
    assert not any(secret.encode() in d for d in dump)


def test_enabled_flag_survives_revoking_every_key_and_is_seen_by_another_replica(
    redis_proc: RedisProcess,
) -> None:
    async def body(keys: KeyStore) -> bool:
        key, _ = await keys.create("delta", ("*",), 0.0, 0)
        await keys.revoke(key.id)
        replica = KeyStore(connect(redis_proc.url))
        await replica.refresh()
        return replica.is_enabled

    assert run_with_keys(redis_proc.url, body) is True


def test_redis_outage_keeps_known_keys_and_refuses_unknown_and_revoked() -> None:
    with RedisProcess() as proc:

        async def body(keys: KeyStore) -> None:
            key, secret = await keys.create("e", ("*",), 0.0, 0)
            gone, gone_secret = await keys.create("f", ("*",), 0.0, 0)
            assert await keys.lookup(secret) == key
            await keys.revoke(gone.id)
            proc.stop(kill=True)
            assert await keys.lookup(secret) == key  # last good record
            assert await keys.lookup(gone_secret) is None  # revoked here before the outage
            with pytest.raises(StoreUnavailable):
                await keys.lookup("pk-never-seen")

        run_with_keys(proc.url, body)
