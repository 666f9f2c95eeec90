"""Issue 12 over real HTTP: auth fails closed at start-up, token quotas are held at admission,
/metrics hides tenants, text access logs cannot be forged, compose's Prometheus sends the token."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from prefix_store.redis_store import connect
from server.engine.stats import FinishedRequest, StepStats
from server.metrics import Metrics, PerTask
from server.tenancy.keys import KeyStore
from tests.redis_server import RedisProcess
from tests.server_process import ROOT, ServerProcess, upload_adapter
from tests.tiny_models import Adapter

ADMIN = "hardening-admin-token"
METRICS = "hardening-metrics-token"


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _generate(server: ServerProcess, token: str | None, **extra: object) -> httpx.Response:
    body = {"task_id": "acme:one", "input_ids": [5, 6, 7], "max_new_tokens": 2, **extra}
    return httpx.post(server.url + "/generate", json=body, headers=_auth(token) if token else {}, timeout=30)


def _with_admin_token(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True)
    (data_dir / "admin_token").write_text(ADMIN + "\n")
    return data_dir


def _create_key_in_redis(url: str, scopes: tuple[str, ...]) -> str:
    """A key made as a replica with the same admin token makes it (its record MAC-ed)."""

    async def create() -> str:
        client = connect(url)
        try:
            return (await KeyStore(client, ADMIN).create("early", scopes, 0.0, 0))[1]
        finally:
            await client.aclose()

    return asyncio.run(create())


def test_auth_fails_closed_until_the_key_store_is_read(
    gpt2_dir: Path, adapter: Adapter, tmp_path: Path
) -> None:
    """Finding 4: a replica started while Redis was down came up open (development mode), and
    unauthenticated requests got 200 on a tenant's task in the moments after Redis came back."""
    with RedisProcess(persistent=True) as redis_proc:
        secret = _create_key_in_redis(redis_proc.url, ("acme:*",))
        redis_proc.stop()  # keys exist, but the server cannot read them when it starts
        flags = ["--model", str(gpt2_dir), "--redis-url", redis_proc.url]
        server = ServerProcess(_with_admin_token(tmp_path / "data"), *flags)
        starter = threading.Thread(target=server.start, kwargs={"timeout_s": 120}, daemon=True)
        starter.start()
        try:
            deadline = time.monotonic() + 120
            while not _is_up(server):
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.2)
            for token in (None, "anything", secret):
                closed = _generate(server, token)
                assert closed.status_code == 503, closed.text
                assert closed.json()["error"]["code"] == "unavailable" and closed.headers["retry-after"]
            v1 = httpx.post(server.url + "/v1/completions", json={"model": "acme:one", "prompt": "x"})
            assert v1.status_code == 503
            assert httpx.get(server.url + "/v1/models").status_code == 503
            redis_proc.start()  # same port; the key is still there (AOF)
            answers = []
            while len(answers) < 400 and (not answers or answers[-1] != 401):
                answers.append(_generate(server, None).status_code)
            assert set(answers) <= {503, 401} and answers[-1] == 401, answers  # never open
            starter.join(120)
            with httpx.Client(timeout=30) as client:
                assert (
                    upload_adapter(client, server, "acme:one", adapter.weights, adapter.config).status_code
                    == 201
                )
            assert _generate(server, secret).status_code == 200
            assert _generate(server, None).status_code == 401
            assert "DEVELOPMENT MODE" not in server.log_tail(100_000)
        finally:
            server.stop()


def _is_up(server: ServerProcess) -> bool:
    try:
        return httpx.get(server.url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def served(
    gpt2_dir: Path, adapter: Adapter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server with a metrics token, in development mode until a test creates a key."""
    root = tmp_path_factory.mktemp("hardening")
    with RedisProcess() as redis_proc:
        flags = ["--model", str(gpt2_dir), "--redis-url", redis_proc.url, "--max-prompts", "256"]
        env = {"PREFIX_SERVE_METRICS_TOKEN": METRICS}
        with ServerProcess(_with_admin_token(root / "data"), *flags, env=env) as server:
            with httpx.Client(timeout=30) as client:
                for task_id in ("acme:one", "beta:secret-project"):
                    response = upload_adapter(client, server, task_id, adapter.weights, adapter.config)
                    assert response.status_code == 201
            yield server


def _metrics(server: ServerProcess) -> str:
    response = httpx.get(server.url + "/metrics", headers=_auth(METRICS))
    assert response.status_code == 200
    return response.text


def test_metrics_need_the_token_and_drop_task_labels_once_keys_exist(served: ServerProcess) -> None:
    """Finding 6: `task="beta:secret-project"` and its activity were readable without a credential."""
    assert httpx.get(served.url + "/metrics").status_code == 401
    wrong = httpx.get(served.url + "/metrics", headers=_auth("not-it"))
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    assert _generate(served, None, task_id="beta:secret-project").status_code == 200
    before = _metrics(served)
    assert 'task="beta:secret-project"' in before  # development mode: per-task labels (auto)
    requests_before = _sum_samples(before, "prefix_server_task_requests_total")
    key = httpx.post(
        served.url + "/admin/keys", json={"name": "m", "scopes": ["beta:*"]}, headers=_auth(ADMIN)
    ).json()["key"]
    deadline = time.monotonic() + 5
    while _generate(served, None).status_code != 401:  # the server notices the first key
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _generate(served, key, task_id="beta:secret-project").status_code == 200
    after = _metrics(served)
    assert "secret-project" not in after and 'task="acme:one"' not in after and 'task="other"' in after
    assert _sum_samples(after, "prefix_server_task_requests_total") >= requests_before  # kept, as other


def _sum_samples(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_a_key_never_gets_more_tokens_than_its_bucket(served: ServerProcess) -> None:
    """Finding 3(a): a 200 tokens/min key received 24,000 tokens in one request (15 prompts x n=16
    x 100 tokens): tokens were charged at the end only. Now they are held at admission."""
    key = httpx.post(
        served.url + "/admin/keys",
        json={"name": "q", "scopes": ["acme:*"], "tokens_per_minute": 200},
        headers=_auth(ADMIN),
    ).json()["key"]
    body = {"model": "acme:one", "prompt": [[5, 6]] * 15, "n": 16, "max_tokens": 100}
    never = httpx.post(served.url + "/v1/completions", json=body, headers=_auth(key), timeout=60)
    assert never.status_code == 400, never.text  # /v1 answers OpenAI's 400 for a 422
    assert never.json()["error"]["code"] == "invalid_request"
    assert "tokens_per_minute=200" in never.json()["error"]["message"]
    too_long = _generate(served, key, max_new_tokens=201)
    assert too_long.status_code == 422 and "tokens_per_minute=200" in too_long.json()["error"]["message"]
    # an error after admission (unknown task) gives its hold of 150 back at once
    assert _generate(served, key, task_id="acme:missing", max_new_tokens=150).status_code == 404
    deadline = time.monotonic() + 3
    while (first := _generate(served, key, max_new_tokens=150, ignore_eos=True)).status_code == 429:
        assert time.monotonic() < deadline, "the 404's hold was never given back"
        time.sleep(0.1)
    assert first.status_code == 200
    time.sleep(0.5)  # its 150 tokens are charged (and its hold released) just after the answer
    # ~50 left: a request that may generate 100 waits (~15 s); one that may generate 40 fits
    refused = _generate(served, key, max_new_tokens=100)
    assert refused.status_code == 429 and 10 <= int(refused.headers["retry-after"]) <= 16, refused.text
    assert _generate(served, key, max_new_tokens=40).status_code == 200


def test_text_access_log_escapes_control_characters(served: ServerProcess) -> None:
    """Finding 8: a decoded path with %0a forged a whole log line."""
    forged = "2026-01-01 00:00:00,000 INFO prefix_server.access: request method=POST path=/admin status=200"
    path = "/x%0a" + forged.replace(" ", "%20") + "%1b[31m"
    assert httpx.get(served.url + path).status_code == 404
    escaped = re.compile(r"path=/x\\n2026-01-01 00:00:00,000 INFO .*\\x1b\[31m status=404")
    deadline = time.monotonic() + 5  # the access line is written just after the answer
    while not escaped.search(log := served.log_tail(200_000)):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.1)
    assert not any(line.startswith(forged) for line in log.splitlines())


def test_compose_prometheus_sends_the_servers_metrics_token() -> None:
    """Both services take the one required $PREFIX_METRICS_TOKEN (no default); Prometheus writes it
    to the file its scrape jobs read before it starts."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server_env = compose["services"]["server"]["environment"]
    prometheus = compose["services"]["prometheus"]
    required = re.fullmatch(r"\$\{PREFIX_METRICS_TOKEN:\?.+\}", server_env["PREFIX_SERVE_METRICS_TOKEN"])
    assert required is not None
    assert prometheus["environment"]["PREFIX_METRICS_TOKEN"] == server_env["PREFIX_SERVE_METRICS_TOKEN"]
    config = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        assert job["authorization"] == {"type": "Bearer", "credentials_file": "metrics_token"}
    script = prometheus["entrypoint"][-1]
    assert "> /etc/prometheus/metrics_token" in script and '"$$PREFIX_METRICS_TOKEN"' in script
    assert script.endswith("--config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/prometheus")


def _finish(metrics: Metrics, task_id: str) -> None:
    done = FinishedRequest(task_id, "length", 3, 2, 0.0, 0.01, 0.01, 0.02)
    metrics.observe_step(StepStats(1, 0, 2, 0.01, (done,)))


@pytest.mark.parametrize(
    ("mode", "labelled_without_keys", "labelled_with_keys"),
    [("auto", True, False), ("on", True, True), ("off", False, False)],
)
def test_per_task_metric_labels_follow_the_setting(
    mode: PerTask, labelled_without_keys: bool, labelled_with_keys: bool
) -> None:
    """`--metrics-per-task`: auto = per-task labels until API keys exist; counts stay, as `other`."""
    has_keys = False
    metrics = Metrics(20, mode)
    metrics._has_keys = lambda: has_keys  # what `bind` wires to the key store
    _finish(metrics, "beta:secret")
    assert ('task="beta:secret"' in metrics.render().decode()) == labelled_without_keys
    has_keys = True
    _finish(metrics, "beta:secret")
    text = metrics.render().decode()
    assert ('task="beta:secret"' in text) == labelled_with_keys
    assert _sum_samples(text, "prefix_server_task_requests_total") == 2
