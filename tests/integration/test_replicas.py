"""Two server processes sharing one Redis: what one writes, the other serves within 1 s."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.redis_server import RedisProcess
from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import Adapter, save_adapter, save_tiny_model

BODY = {"task_id": "acme:t", "input_ids": [5, 6, 7], "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4096 positions, so one generation can outlast an upload."""
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("m") / "model", max_positions=4096)


@pytest.fixture(scope="module")
def replicas(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess, RedisProcess]]:
    root = tmp_path_factory.mktemp("replicas")
    with RedisProcess() as redis_proc:
        flags = ["--model", str(model_dir), "--redis-url", redis_proc.url, "--max-new-tokens", "4000"]
        with ServerProcess(root / "a", *flags) as a, ServerProcess(root / "b", *flags) as b:
            yield a, b, redis_proc


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Adapter]:
    root = tmp_path_factory.mktemp("versions")
    return [save_adapter(model_dir, root / f"v{i}", 3 + i, seed=40 + i) for i in range(3)]


def _cache_items(client: httpx.Client, server: ServerProcess) -> list[dict]:
    return list(client.get(server.url + "/admin/cache", headers=server.admin_headers).json()["items"])


def _generate(client: httpx.Client, server: ServerProcess) -> httpx.Response:
    return client.post(server.url + "/generate", json=BODY)


def _seconds_until(predicate, timeout_s: float = 5.0) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not reached within {timeout_s}s")


def test_upload_and_delete_through_a_are_seen_by_b_within_a_second(
    replicas: tuple[ServerProcess, ServerProcess, RedisProcess], adapters: list[Adapter], client: httpx.Client
) -> None:
    a, b, _ = replicas
    assert upload_adapter(client, a, "acme:t", adapters[0].weights, adapters[0].config).status_code == 201
    first = _generate(client, b).json()  # b loads v1 and keeps it resident
    assert first["usage"]["prefix_tokens"] == 3
    assert [i["task_id"] for i in client.get(b.url + "/admin/cache", headers=b.admin_headers).json()["items"]]

    put = upload_adapter(client, a, "acme:t", adapters[1].weights, adapters[1].config).json()
    elapsed = _seconds_until(lambda: _generate(client, b).json()["prefix_version"] == put["version"])
    print(f"replica b served the new version after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    second = _generate(client, b).json()
    assert (
        second["usage"]["prefix_tokens"] == 4
        and second["token_ids"] == _generate(client, a).json()["token_ids"]
    )

    assert client.delete(a.url + "/admin/prefixes/acme:t", headers=a.admin_headers).status_code == 204
    elapsed = _seconds_until(lambda: _generate(client, b).status_code == 404)
    print(f"replica b answered 404 after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0


def test_a_lost_change_event_is_caught_by_the_version_check(
    replicas: tuple[ServerProcess, ServerProcess, RedisProcess], adapters: list[Adapter], client: httpx.Client
) -> None:
    """A write that published nothing (as if the message was lost) still reaches b within ~1 s."""
    a, b, redis_proc = replicas
    put = upload_adapter(client, a, "acme:t", adapters[0].weights, adapters[0].config).json()
    assert _generate(client, b).json()["prefix_version"] == put["version"]  # resident on b
    raw = redis.Redis.from_url(redis_proc.url)
    try:
        key = next(k for k in raw.scan_iter(match="pfx:*:task:acme:t"))
        version = raw.incr(key.replace(b":task:", b":ver:"))
        raw.hset(key, "version", version)  # same bytes, new version, and no PUBLISH
    finally:
        raw.close()
    elapsed = _seconds_until(lambda: _generate(client, b).json()["prefix_version"] == version)
    print(f"replica b caught the unannounced write after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.5  # the check runs every 0.5 s


def test_a_running_request_finishes_on_the_version_it_started_with(
    replicas: tuple[ServerProcess, ServerProcess, RedisProcess], adapters: list[Adapter], client: httpx.Client
) -> None:
    a, _, _ = replicas
    v1 = upload_adapter(client, a, "acme:t", adapters[0].weights, adapters[0].config).json()
    body = {**BODY, "max_new_tokens": 400, "stream": True}
    reference = client.post(a.url + "/generate", json={**body, "stream": False}).json()
    with client.stream("POST", a.url + "/generate", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # it is running on v1 now
        cache = client.get(a.url + "/admin/cache", headers=a.admin_headers).json()
        pinned = [i["is_pinned"] for i in cache["items"]]
        v2 = upload_adapter(client, a, "acme:t", adapters[2].weights, adapters[2].config).json()
        mid = client.get(a.url + "/metrics").text
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "prefix_server_running_requests 1.0" in mid  # the upload landed while it was running
    assert pinned == [True, True]  # device + host entries of the running task: never evicted meanwhile
    _seconds_until(lambda: not any(i["is_pinned"] for i in _cache_items(client, a)))
    assert events[-1]["prefix_version"] == v1["version"] and events[-1]["usage"]["prefix_tokens"] == 3
    streamed = reference["token_ids"][:1] + [t for e in events for t in e["token_ids"]]
    assert streamed == reference["token_ids"]
    after = client.post(a.url + "/generate", json={**body, "stream": False}).json()
    assert after["prefix_version"] == v2["version"] and after["usage"]["prefix_tokens"] == 5
