"""KeyStore against a real redis-server: secrets never stored, revocation, outage behaviour."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TypeVar

import pytest

from prefix_store.errors import StoreUnavailable
from prefix_store.redis_store import connect
from server.tenancy.keys import KeyStore, hash_secret
from tests.redis_server import RedisProcess

T = TypeVar("T")
ADMIN_TOKEN = "admin-token-of-this-deployment"  # every replica shares it; it keys the records' MAC


def run_with_keys(url: str, body: Callable[[KeyStore], Awaitable[T]]) -> T:
    async def scenario() -> T:
        client = connect(url)
        try:
            return await body(KeyStore(client, ADMIN_TOKEN))
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
        await asyncio.sleep(0.002)  # created_at has millisecond resolution: keep the order certain
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
        replica = KeyStore(connect(redis_proc.url), ADMIN_TOKEN)
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


def test_a_record_written_behind_the_servers_back_is_refused_and_logged(
    redis_proc: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12, finding 7: a record SET straight into Redis granted `*` and was invisible to listings."""

    async def body(keys: KeyStore) -> None:
        real, real_secret = await keys.create("real", ("acme:*",), 0.0, 0)
        forged_secret = "pk-forged"
        record = {**asdict(real), "id": "key_00000000000000ff", "scopes": ["*"]}
        raw = connect(redis_proc.url)
        try:
            await raw.set("pfx:apikey:" + hash_secret(forged_secret), json.dumps(record))
            # a real record widened in place, MAC kept: the MAC covers the fields
            stored = json.loads(await raw.get("pfx:apikey:" + hash_secret(real_secret)) or b"{}")
            await raw.set("pfx:apikey:" + hash_secret(real_secret), json.dumps({**stored, "scopes": ["*"]}))
            await raw.hset("pfx:apikeys", "key_00000000000000ff", hash_secret(forged_secret))
        finally:
            await raw.aclose()
        with caplog.at_level(logging.WARNING, logger="server.tenancy.keys"):
            assert await keys.lookup(forged_secret) is None
            assert await keys.lookup(real_secret) is None
            listed = {k.id for k in await keys.list()}
            assert real.id not in listed and "key_00000000000000ff" not in listed
        assert keys.num_forged >= 2
        assert "missing or wrong MAC" in caplog.text and forged_secret not in caplog.text

    run_with_keys(redis_proc.url, body)


def test_another_replica_with_the_same_admin_token_accepts_the_record_another_token_does_not(
    redis_proc: RedisProcess,
) -> None:
    async def body(keys: KeyStore) -> tuple[bool, bool]:
        key, secret = await keys.create("shared", ("x:*",), 0.0, 0)
        same, other = connect(redis_proc.url), connect(redis_proc.url)
        try:
            seen_by_same = await KeyStore(same, ADMIN_TOKEN).lookup(secret) == key
            seen_by_other = await KeyStore(other, "another-token").lookup(secret) is not None
        finally:
            await same.aclose()
            await other.aclose()
        return seen_by_same, seen_by_other

    assert run_with_keys(redis_proc.url, body) == (True, False)


def test_not_known_until_read_once_and_a_failed_read_is_never_no_keys() -> None:
    """Issue 12, finding 4: a replica started with Redis down must not take "could not read" for "no keys"."""
    with RedisProcess() as proc:

        async def body(keys: KeyStore) -> list[tuple[bool, bool]]:
            states = []
            proc.stop(kill=True)
            await keys.refresh()
            states.append((keys.is_known, keys.is_enabled))
            proc.start()
            await keys.refresh()
            states.append((keys.is_known, keys.is_enabled))
            return states

        assert run_with_keys(proc.url, body) == [(False, False), (True, False)]
