"""Maintenance behind the proxy, as an operator does it: `prefix-cluster` with 2 replicas, a
steady load of concurrent generations, replica A drained at its own port (`POST /admin/drain`),
its in-flight work finishes, what HAProxy still sends it before its health checks notice (the
drain's grace) is served, then it gets no new work; it is undrained and gets work again: not one
request fails. Then a generation cut short by a shutdown
(500 `interrupted`, after work was done) is not retried on the other replica."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from infra.embedded_redis import free_port
from prefix_cluster import ClusterError
from prefix_cluster.haproxy import find_haproxy
from tests.server_process import clean_env
from tests.tiny_models import save_adapter, save_tiny_model

TASKS = [f"acme:d{i}" for i in range(8)]
NUM_CLIENTS = 4


@dataclass
class Cluster:
    url: str
    admin: dict[str, str]
    replicas: dict[str, str]  # X-Replica -> its own URL
    pids: dict[str, int]  # X-Replica -> pid


@dataclass(frozen=True)
class Answer:
    sent: float
    status: int
    replica: str


def _replica_pids(cluster_pid: int) -> dict[int, int]:
    """port -> pid of the cluster's replica children (from /proc)."""
    found = {}
    for task in Path(f"/proc/{cluster_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            words = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if "--port" in words:
                found[int(words[words.index("--port") + 1])] = int(pid)
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        find_haproxy()
    except ClusterError as exc:
        pytest.skip(f"no HAProxy here ({exc})")
    root = tmp_path_factory.mktemp("drain-cluster")
    model = save_tiny_model("gpt2", root / "model", max_positions=4096)
    port, log_path = free_port(), root / "cluster.log"
    command = [sys.executable, "-m", "prefix_cluster", "--replicas", "2", "--port", str(port)]
    command += ["--data-dir", str(root / "data"), "--drain-seconds", "1", "--"]
    command += ["--model", str(model), "--max-new-tokens", "4000"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "cluster ready:" not in (text := log_path.read_text(errors="replace")):
            assert proc.poll() is None and time.monotonic() < deadline, text[-4000:]
            time.sleep(0.2)
        admin = {"Authorization": f"Bearer {(root / 'data' / 'admin_token').read_text().strip()}"}
        ports = [int(p) for p in re.findall(r"cluster: replica r\d http://127\.0\.0\.1:(\d+)", text)]
        pids = _replica_pids(proc.pid)
        names = {p: httpx.get(f"http://127.0.0.1:{p}/health").headers["x-replica"] for p in ports}
        cluster = Cluster(
            f"http://127.0.0.1:{port}",
            admin,
            {names[p]: f"http://127.0.0.1:{p}" for p in ports},
            {names[p]: pids[p] for p in ports},
        )
        for i, task in enumerate(TASKS):
            adapter = save_adapter(model, root / f"a{i}", 3, seed=70 + i)
            files = {"weights": ("a.safetensors", adapter.weights), "config": ("c.json", adapter.config)}
            response = httpx.put(f"{cluster.url}/admin/prefixes/{task}", files=files, headers=admin)
            assert response.status_code == 201, response.text
        yield cluster
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _body(task: str, max_new_tokens: int = 12) -> dict[str, object]:
    return {"task_id": task, "input_ids": [5, 6, 7], "max_new_tokens": max_new_tokens, "ignore_eos": True}


class Load:
    """NUM_CLIENTS clients sending generations of every task through the proxy until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(NUM_CLIENTS)]

    def _client(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = offset
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post("/generate", json=_body(TASKS[i % len(TASKS)]))
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text}")
                self.answers.append(Answer(sent, response.status_code, response.headers.get("x-replica", "")))
                i += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def served_by(self, replica: str, after: float = 0.0) -> int:
        return sum(a.replica == replica for a in list(self.answers) if a.sent >= after)


def _generate_requests(replica_url: str) -> Counter[str]:
    """Requests replica answered on /generate, by status (its own /metrics)."""
    counts: Counter[str] = Counter()
    for line in httpx.get(replica_url + "/metrics").text.splitlines():
        if line.startswith("prefix_server_requests_total{") and 'endpoint="/generate"' in line:
            status = re.search(r'status="(\d+)"', line)
            assert status is not None
            counts[status.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def _wait(predicate: object, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() - started < timeout_s, what
        time.sleep(0.05)
    return time.monotonic() - started


def test_drain_and_undrain_a_replica_under_load_fails_no_request(cluster: Cluster) -> None:
    name_a, name_b = sorted(cluster.replicas)
    url_a = cluster.replicas[name_a]
    with Load(cluster.url) as load:
        _wait(lambda: load.served_by(name_a) >= 3 and load.served_by(name_b) >= 3, 30, "both serve")
        state = httpx.post(url_a + "/admin/drain", headers=cluster.admin).json()  # default grace 3 s
        drained_at = time.monotonic()
        assert state["draining"] and state["maintenance"] and not state["refusing"], state
        in_flight_at_drain = state["requests_in_flight"]
        to_drained = _wait(
            lambda: httpx.get(url_a + "/admin/drain", headers=cluster.admin).json()["drained"], 30, "drained"
        )
        # by the end of the grace HAProxy's checks (inter 1 s, fall 2) took A out: no request at all
        before = _generate_requests(url_a)
        b_before = load.served_by(name_b)
        time.sleep(2.0)
        assert _generate_requests(url_a) == before, "A got work after the health checks noticed"
        assert load.served_by(name_b) > b_before  # B carries the whole load meanwhile
        back = httpx.delete(url_a + "/admin/drain", headers=cluster.admin).json()
        undrained_at = time.monotonic()
        assert not back["draining"]
        to_back = _wait(lambda: load.served_by(name_a, after=undrained_at) >= 3, 15, "A gets work again")
        time.sleep(0.5)
    answers = load.answers
    in_grace = [a for a in answers if a.replica == name_a and drained_at < a.sent < undrained_at]
    print(
        f"\n{len(answers)} requests from {NUM_CLIENTS} clients; A drained with {in_flight_at_drain} in "
        f"flight, refusing and idle after {to_drained:.2f} s; A served {len(in_grace)} sent after "
        f"the drain (before HAProxy noticed), refused {before['503']}; A served again "
        f"{to_back:.2f} s after undrain; failures: {len(load.failures)}"
    )
    assert load.failures == [] and all(a.status == 200 for a in answers)  # 0 failed requests
    assert all(a.sent < drained_at + 3.0 for a in in_grace)  # nothing sent after the grace
    assert before["200"] >= 3  # A did serve before the drain


def test_a_generation_cut_short_after_work_is_not_retried(cluster: Cluster) -> None:
    """SIGTERM past --drain-seconds (1 s) cuts a long generation: 500 `interrupted` from its
    replica, which HAProxy does not retry (no 503: work was done), so no second run elsewhere."""
    task = TASKS[0]
    home = httpx.post(cluster.url + "/generate", json=_body(task), timeout=60).headers["x-replica"]
    answer: list[httpx.Response] = []
    worker = threading.Thread(
        target=lambda: answer.append(
            httpx.post(cluster.url + "/generate", json=_body(task, 4000), timeout=120)
        )
    )
    worker.start()
    _wait(lambda: httpx.get(cluster.replicas[home] + "/admin/drain", headers=cluster.admin).json()[
        "generations_running"] > 0, 30, "running")  # fmt: skip
    os.kill(cluster.pids[home], signal.SIGTERM)
    worker.join(60)
    response = answer[0]
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "interrupted"
    assert response.headers["x-replica"] == home and "x-prefix-retry-safe" not in response.headers
