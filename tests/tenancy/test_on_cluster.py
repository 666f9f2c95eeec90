"""API keys (HMAC-sealed records) and token buckets (Lua) on a real 3-primary Redis Cluster:
every script stays within one slot, and keys of different ids land on different primaries."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

import pytest
from redis.crc import key_slot

from infra.connection import connect
from server.tenancy.keys import KeyStore, hash_secret
from server.tenancy.rate_limit import RateLimiter
from tests.redis_topology import ClusterSetup, redis7_server

pytestmark = pytest.mark.skipif(redis7_server() is None, reason="needs redis-server >= 7 on PATH")
ADMIN_TOKEN = "cluster-admin-token"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSetup]:
    with contextlib.closing(ClusterSetup(3)) as setup:
        yield setup


def test_keys_and_rate_limits_work_on_a_cluster(cluster: ClusterSetup) -> None:
    async def body() -> None:
        client = connect(cluster.url)
        try:
            keys = KeyStore(client, ADMIN_TOKEN)
            created = [await keys.create(f"k{i}", ("acme:*",), 2.0, 600) for i in range(12)]
            for key, secret in created:
                assert await keys.lookup(secret) == key
            assert sorted(k.id for k in await keys.list()) == sorted(k.id for k, _ in created)
            slots = {key_slot(f"pfx:apikey:{hash_secret(secret)}".encode()) for _, secret in created}
            owners = {port for port in cluster.ports for slot in slots if slot in cluster.slots_of(port)}
            assert len(owners) >= 2, "key records should spread over the primaries"
            forged_key, forged_secret = created[0]
            record = json.loads(await client.get("pfx:apikey:" + hash_secret(forged_secret)) or b"{}")
            await client.set(
                "pfx:apikey:" + hash_secret(forged_secret), json.dumps({**record, "scopes": ["*"]})
            )
            assert await keys.lookup(forged_secret) is None and keys.num_forged == 1  # the MAC still holds
            assert await keys.revoke(created[1][0].id) == created[1][0]
            assert await keys.lookup(created[1][1]) is None
            limiter = RateLimiter(client)
            answers = [await limiter.admit(key, num_tokens=10) for key, _ in created[2:5] for _ in range(4)]
            assert [a.is_admitted for a in answers] == [True, True, False, False] * 3  # 2 req/s each
            assert limiter.num_errors == 0
        finally:
            await client.aclose()

    asyncio.run(body())
