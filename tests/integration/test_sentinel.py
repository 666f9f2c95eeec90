"""A server on `redis+sentinel://` survives its primary's crash (1 primary, 1 replica, 3 sentinels,
down-after-milliseconds 1000): resident tasks never fail, everything else is back within the
failover time + 2 s, and every upload acknowledged before the crash is still there."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.connection import connect
from prefix_store.redis_store import RedisPrefixStore
from tests.integration.redis_helpers import canonical, create_key, generate, seconds_until, upload
from tests.redis_topology import SentinelSetup, redis7_server
from tests.server_process import ServerProcess, metric_value

pytestmark = pytest.mark.skipif(redis7_server() is None, reason="needs redis-server >= 7 on PATH")


METRICS_TOKEN = "sentinel-metrics"


@pytest.fixture(scope="module")
def sentinel_server(
    gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SentinelSetup, ServerProcess]]:
    root = tmp_path_factory.mktemp("sentinel")
    with contextlib.closing(SentinelSetup(down_after_ms=1000)) as sentinels:
        flags = ["--model", str(gpt2_dir), "--redis-url", sentinels.url, "--redis-wait-ms", "500"]
        flags += ["--metrics-token", METRICS_TOKEN]  # the test creates keys: then /metrics needs it
        with ServerProcess(root / "server", *flags) as server:
            yield sentinels, server


class Traffic(threading.Thread):
    """Resident-task generations, uploads and /ready probes, back to back, until stopped."""

    def __init__(self, server: ServerProcess, key: str) -> None:
        super().__init__(daemon=True)
        self.server, self.key = server, key
        self.stop = threading.Event()
        self.resident_statuses: list[int] = []
        self.acknowledged: dict[str, str] = {}  # task id -> sha256 of its tensor bytes
        self.ready: list[tuple[float, int]] = []  # (time, /ready status)

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            for i in range(100_000):
                if self.stop.is_set():
                    return
                self.resident_statuses.append(
                    generate(client, self.server, "acme:resident", self.key).status_code
                )
                weights, digest = canonical(1000 + i)
                if upload(client, self.server, f"acme:up{i}", weights).status_code == 201:
                    self.acknowledged[f"acme:up{i}"] = digest
                self.ready.append((time.monotonic(), client.get(self.server.url + "/ready").status_code))


def _stored_digests(url: str, fingerprint: str, task_ids: list[str]) -> dict[str, str | None]:
    async def read() -> dict[str, str | None]:
        client = connect(url)
        try:
            store = RedisPrefixStore(client, fingerprint)
            found = {t: await store.get(t) for t in task_ids}
        finally:
            await client.aclose()
        return {t: (hashlib.sha256(got[1]).hexdigest() if got else None) for t, got in found.items()}

    return asyncio.run(read())


def test_primary_crash_during_traffic(sentinel_server: tuple[SentinelSetup, ServerProcess]) -> None:
    sentinels, server = sentinel_server
    client = httpx.Client(timeout=30)
    key = create_key(client, server, requests_per_second=1000).json()["key"]
    limited = create_key(client, server, requests_per_second=1).json()["key"]
    for task_id, seed in (("acme:resident", 1), ("acme:cold", 2)):
        assert upload(client, server, task_id, canonical(seed)[0]).status_code == 201
    assert generate(client, server, "acme:resident", key).status_code == 200  # now resident
    fingerprint = client.get(server.url + "/admin/prefixes/acme:cold", headers=server.admin_headers).json()[
        "model_fingerprint"
    ]
    traffic = Traffic(server, key)
    traffic.start()
    time.sleep(1.0)
    old_primary = sentinels.primary
    acknowledged_before = dict(traffic.acknowledged)
    killed_at = time.monotonic()
    sentinels.kill(old_primary)
    failover_s = seconds_until(lambda: sentinels.current_primary() != old_primary, timeout_s=20)
    recovery = {
        "upload": seconds_until(
            lambda: upload(client, server, "acme:after", canonical(3)[0]).status_code == 201, 20
        ),
        "cold task": seconds_until(lambda: generate(client, server, "acme:cold", key).status_code == 200, 20),
        "new key": seconds_until(lambda: _new_key_works(client, server), 20),
        "rate limit": seconds_until(lambda: _is_limited(client, server, limited), 20),
    }
    recovery = {
        name: round(failover_s + seconds, 2) for name, seconds in recovery.items()
    }  # from the kill on
    time.sleep(0.5)
    traffic.stop.set()
    traffic.join(timeout=60)
    print(f"\nsentinel failover {failover_s:.2f} s after the kill; working again after: {recovery}")
    assert all(seconds <= failover_s + 2.0 for seconds in recovery.values()), (failover_s, recovery)
    assert set(traffic.resident_statuses) == {200}, "a resident task failed during the failover"
    assert len(acknowledged_before) >= 2
    stored = _stored_digests(sentinels.url, fingerprint, sorted(traffic.acknowledged))
    assert stored == traffic.acknowledged, "an acknowledged upload was lost or changed"
    _check_outage_was_visible(client, server, traffic, killed_at)


def _new_key_works(client: httpx.Client, server: ServerProcess) -> bool:
    created = create_key(client, server)
    return (
        created.status_code == 201
        and generate(client, server, "acme:resident", created.json()["key"]).status_code == 200
    )


def _is_limited(client: httpx.Client, server: ServerProcess, limited: str) -> bool:
    """The 1 request/s key answers 429 on a quick second request: its bucket is in Redis again."""
    statuses = [generate(client, server, "acme:resident", limited).status_code for _ in range(2)]
    return 429 in statuses


def _check_outage_was_visible(
    client: httpx.Client, server: ServerProcess, traffic: Traffic, killed_at: float
) -> None:
    after = [status for at, status in traffic.ready if at > killed_at]
    assert 503 in after and after[-1] == 200, "/ready did not show the outage and the recovery"
    text = client.get(server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert metric_value(text, "prefix_server_redis_up") == 1.0
    assert metric_value(text, "prefix_server_redis_outages_total") >= 1
    last = metric_value(text, "prefix_server_redis_last_outage_seconds")
    print(f"metrics: last outage {last:.2f} s")
    assert 0 < last < 10
