"""Tenant keys over real HTTP, two server processes on one Redis: scopes (existence never leaks),
`/v1/models` filtered, revocation and rate limits holding across replicas, dev mode."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.redis_server import RedisProcess
from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import Adapter

TASKS = ("acme:one", "acme:two", "beta:one")


@pytest.fixture(scope="module")
def replicas(
    gpt2_dir: Path, adapter: Adapter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """A and B share a Redis of their own (creating a key puts that Redis in key mode for good)."""
    root = tmp_path_factory.mktemp("tenancy")
    for name in ("a", "b"):  # replicas share the admin token: it keys the API-key records' MAC
        (root / name).mkdir()
        (root / name / "admin_token").write_text("shared-admin-token-of-a-and-b\n")
    with RedisProcess() as redis_proc:
        flags = ["--model", str(gpt2_dir), "--redis-url", redis_proc.url]
        with ServerProcess(root / "a", *flags) as a, ServerProcess(root / "b", *flags) as b:
            with httpx.Client(timeout=30) as client:
                for task_id in TASKS:
                    assert (
                        upload_adapter(client, a, task_id, adapter.weights, adapter.config).status_code == 201
                    )
            yield a, b


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _generate(server: ServerProcess, task_id: str, token: str | None, **extra: object) -> httpx.Response:
    body = {"task_id": task_id, "input_ids": [5, 6, 7], "max_new_tokens": 4, "ignore_eos": True, **extra}
    return httpx.post(server.url + "/generate", json=body, headers=_auth(token) if token else {}, timeout=30)


def _create_key(server: ServerProcess, scopes: list[str], **limits: object) -> dict[str, object]:
    body = {"name": "test", "scopes": scopes, **limits}
    response = httpx.post(server.url + "/admin/keys", json=body, headers=server.admin_headers, timeout=10)
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_without_keys_generation_is_open_and_the_log_says_so(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = replicas
    assert "DEVELOPMENT MODE" in a.log_tail(100_000)
    assert _generate(a, "acme:one", None).status_code == 200
    assert _generate(b, "beta:one", "whatever-the-openai-client-sends").status_code == 200


@pytest.fixture(scope="module")
def keys(replicas: tuple[ServerProcess, ServerProcess]) -> dict[str, str]:
    """Secrets of an `acme:*` key and a `beta:one` key, created through A; B knows within 1 s."""
    a, b = replicas
    secrets = {
        name: str(_create_key(a, scopes)["key"])
        for name, scopes in [("acme", ["acme:*"]), ("beta", ["beta:one"])]
    }
    deadline = time.monotonic() + 1.0
    while _generate(b, "acme:one", None).status_code != 401:
        assert time.monotonic() < deadline, "replica B still open 1 s after the first key was created"
        time.sleep(0.05)
    return secrets


def test_every_generation_route_needs_a_valid_key(
    replicas: tuple[ServerProcess, ServerProcess], keys: dict[str, str]
) -> None:
    for server in replicas:
        for token in (None, "pk-not-a-key"):
            response = _generate(server, "acme:one", token)
            assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
            headers = _auth(token) if token else {}
            completion = {"model": "acme:one", "prompt": [5, 6], "max_tokens": 2}
            v1 = httpx.post(server.url + "/v1/completions", json=completion, headers=headers, timeout=30)
            assert v1.status_code == 401 and v1.json()["error"]["type"] == "authentication_error"
            assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401
        assert _generate(server, "acme:one", keys["acme"]).status_code == 200
        # the admin token may use any task
        assert _generate(server, "beta:one", server.admin_token).status_code == 200


def test_out_of_scope_is_403_and_says_nothing_about_existence(
    replicas: tuple[ServerProcess, ServerProcess], keys: dict[str, str]
) -> None:
    a, _ = replicas
    token = keys["acme"]
    existing, missing = _generate(a, "beta:one", token), _generate(a, "beta:nope", token)
    assert existing.status_code == missing.status_code == 403
    assert existing.json()["error"]["message"].replace("beta:one", "X") == missing.json()["error"][
        "message"
    ].replace("beta:nope", "X")
    for model in ("beta:one", "beta:nope"):
        response = httpx.get(f"{a.url}/v1/models/{model}", headers=_auth(token))
        assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
        completion = {"model": model, "prompt": [5], "max_tokens": 1}
        v1 = httpx.post(a.url + "/v1/completions", json=completion, headers=_auth(token), timeout=30)
        assert v1.status_code == 403
    assert _generate(a, "acme:nope", token).status_code == 404  # inside its own scope: it may know
    assert _generate(a, "acme:two", keys["beta"]).status_code == 403  # an exact-id scope


def test_models_lists_only_the_callers_tasks(
    replicas: tuple[ServerProcess, ServerProcess], keys: dict[str, str]
) -> None:
    _, b = replicas

    def listed(token: str, **params: object) -> list[str]:
        response = httpx.get(b.url + "/v1/models", headers=_auth(token), params=params)
        assert response.status_code == 200
        return [m["id"] for m in response.json()["data"]]

    assert listed(keys["acme"]) == ["acme:one", "acme:two"]
    assert listed(keys["acme"], limit=1) == ["acme:one"]
    assert listed(keys["acme"], limit=1, after="acme:one") == ["acme:two"]
    assert listed(keys["beta"]) == ["beta:one"]
    assert listed(b.admin_token) == sorted(TASKS)


def test_revocation_through_a_holds_on_b_at_once(
    replicas: tuple[ServerProcess, ServerProcess], keys: dict[str, str]
) -> None:
    a, b = replicas
    created = _create_key(a, ["acme:*"])
    secret = str(created["key"])
    assert _generate(b, "acme:one", secret).status_code == 200
    listing = httpx.get(a.url + "/admin/keys", headers=a.admin_headers).json()["items"]
    assert created["id"] in [k["id"] for k in listing] and secret not in str(listing)
    assert httpx.delete(f"{a.url}/admin/keys/{created['id']}", headers=a.admin_headers).status_code == 200
    # B reads the key's record on every request: the very next one is refused (bound: 1 s)
    assert _generate(b, "acme:one", secret).status_code == 401
    assert httpx.delete(f"{a.url}/admin/keys/{created['id']}", headers=a.admin_headers).status_code == 404


def test_requests_per_second_hold_across_replicas(
    replicas: tuple[ServerProcess, ServerProcess], keys: dict[str, str]
) -> None:
    """rps=1 (bucket of 1): 8 requests alternating between A and B inside ~1 s: at most 1 + what
    refilled is admitted; the rest get 429 `rate_limited` with a Retry-After."""
    secret = str(_create_key(replicas[0], ["acme:*"], requests_per_second=1)["key"])
    started = time.monotonic()
    answers = [_generate(replicas[i % 2], "acme:one", secret, max_new_tokens=1) for i in range(8)]
    elapsed = time.monotonic() - started
    admitted = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(admitted) + len(refused) == 8
    assert 1 <= len(admitted) <= 1 + int(elapsed) + 1
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limited"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)


def test_tokens_per_minute_hold_across_replicas(
    replicas: tuple[ServerProcess, ServerProcess], keys: dict[str, str]
) -> None:
    """A 60 tokens/min key spends 50 tokens on A: B refuses a request that may generate 60 (held
    at admission) for about 50 s."""
    a, b = replicas
    secret = str(_create_key(a, ["acme:*"], tokens_per_minute=60)["key"])
    assert _generate(a, "acme:one", secret, max_new_tokens=50).status_code == 200
    deadline = time.monotonic() + 2.0  # the charge lands just after the answer
    while (refused := _generate(b, "acme:one", secret, max_new_tokens=60)).status_code == 200:
        assert time.monotonic() < deadline
    assert refused.status_code == 429 and 45 <= int(refused.headers["retry-after"]) <= 61
    completion = {"model": "acme:one", "prompt": [5], "max_tokens": 60}
    v1 = httpx.post(a.url + "/v1/completions", json=completion, headers=_auth(secret), timeout=30)
    assert v1.status_code == 429 and v1.json()["error"]["type"] == "rate_limit_error"


def test_key_admin_routes_validate_and_need_the_admin_token(
    replicas: tuple[ServerProcess, ServerProcess], keys: dict[str, str]
) -> None:
    a, _ = replicas
    url = a.url + "/admin/keys"
    assert httpx.post(url, json={"name": "x", "scopes": ["*"]}).status_code == 401
    assert (
        httpx.post(url, json={"name": "x", "scopes": ["*"]}, headers=_auth(keys["acme"])).status_code == 403
    )
    for bad in (
        {"name": "x", "scopes": []},
        {"name": "x", "scopes": ["acme/*"]},
        {"name": "", "scopes": ["*"]},
        {"name": "x", "scopes": ["*"], "requests_per_second": -1},
        {"name": "x", "scopes": ["*"], "oops": 1},
    ):
        response = httpx.post(url, json=bad, headers=a.admin_headers)
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", bad
    assert httpx.delete(url + "/key_0000000000000000", headers=a.admin_headers).status_code == 404
