"""`--redis-url` parsing, exactly; the clients each form builds."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from infra.connection import RedisTarget, connect, is_cluster, parse_redis_url, redact


def test_plain_forms_are_left_to_redis_py() -> None:
    assert parse_redis_url("redis://:pw@h:6380/2") == RedisTarget("single", "redis://:pw@h:6380/2")
    assert parse_redis_url("rediss://h/0").is_tls is True
    assert parse_redis_url("unix:///run/redis.sock?db=1").kind == "single"


def test_sentinel_url_in_full() -> None:
    url = "redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:26381/mymaster/3?sentinel_password=sp"
    assert parse_redis_url(url) == RedisTarget(
        kind="sentinel",
        url=url,
        nodes=(("s1", 26380), ("s2", 26379), ("::1", 26381)),
        service="mymaster",
        db=3,
        username="app",
        password="p@ss",
        is_tls=False,
        options={"sentinel_password": "sp"},
    )


def test_sentinel_defaults_and_tls() -> None:
    target = parse_redis_url("rediss+sentinel://:secret@s1/svc?ssl_ca_certs=/ca.pem")
    assert (target.kind, target.nodes, target.service, target.db) == ("sentinel", (("s1", 26379),), "svc", 0)
    assert (target.username, target.password, target.is_tls) == (None, "secret", True)
    assert target.options == {"ssl_ca_certs": "/ca.pem"}


def test_cluster_url() -> None:
    target = parse_redis_url("redis+cluster://u:p@n1:7000,n2:7001,n3")
    assert target == RedisTarget(
        "cluster",
        "redis+cluster://u:p@n1:7000,n2:7001,n3",
        (("n1", 7000), ("n2", 7001), ("n3", 6379)),
        None,
        0,
        "u",
        "p",
    )
    assert parse_redis_url("rediss+cluster://n1:7000/0").is_tls is True


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:6379", "no scheme"),
        ("http://h", "unknown redis URL scheme"),
        ("redis+mesh://h", "unknown redis URL scheme"),
        ("redis+sentinel://s1:26379", "<service>"),
        ("redis+sentinel://s1/svc/0/extra", "<service>"),
        ("redis+sentinel://s1/svc/x", "database must be a number"),
        ("redis+cluster://n1:7000/1", "only database 0"),
        ("redis+cluster://n1:70x0", "bad port"),
        ("redis+cluster://n1:7000,,n2", "empty host"),
        ("redis+cluster://n1?sentinel_password=x", "unknown option"),
        ("redis+sentinel://:hunter2@s1/svc?timeout=3", "unknown option"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_redis_url(url)
    assert "hunter2" not in str(caught.value)


def test_redact_hides_only_the_password() -> None:
    assert redact("redis+sentinel://app:pw@s1,s2/m") == "redis+sentinel://app:***@s1,s2/m"
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"


def test_connect_builds_the_right_client() -> None:
    asyncio.run(_connect_each_form())


async def _connect_each_form() -> None:
    single = connect("redis://127.0.0.1:1/0")
    sentinel = connect("redis+sentinel://127.0.0.1:1/svc/2")
    cluster = connect("redis+cluster://127.0.0.1:1")
    assert type(single) is redis.asyncio.Redis and not is_cluster(single)
    assert type(sentinel) is redis.asyncio.Redis and sentinel.get_connection_kwargs()["db"] == 2
    assert isinstance(cluster, RedisCluster) and is_cluster(cluster)
    for client in (single, sentinel, cluster):
        assert not client.get_connection_kwargs().get("decode_responses")
        await client.aclose()
