"""`prefix-cluster`: 3 replicas behind HAProxy. Affinity, bounded loads, failover, clean stop.

The tests run in order on one cluster (starting 3 replicas is the expensive part); the last two
kill a replica and then stop the whole cluster.
"""

from __future__ import annotations

import os
import signal
import socket
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
from tests.readme_runner import commands, failures, page_blocks, run_commands
from tests.server_process import ROOT, clean_env
from tests.tiny_models import Adapter, save_adapter, save_tiny_model

TASKS = [f"acme:t{i}" for i in range(9)]


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc), so the test can check none outlive the cluster."""
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Cluster:
    proc: subprocess.Popen[bytes]
    url: str
    admin_headers: dict[str, str]
    replica_pids: dict[str, int]  # X-Replica value -> pid
    child_pids: list[int]
    log_path: Path


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "cluster ready:" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"prefix-cluster did not come up:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        find_haproxy()
    except ClusterError as exc:
        pytest.skip(f"no HAProxy here ({exc}): `make haproxy` could not fetch Debian's package")
    root = tmp_path_factory.mktemp("cluster")
    model = save_tiny_model("gpt2", root / "model", max_positions=4096)
    port = free_port()
    log_path = root / "cluster.log"
    command = [sys.executable, "-m", "prefix_cluster", "--replicas", "3", "--port", str(port)]
    command += ["--data-dir", str(root / "data"), "--drain-seconds", "5", "--"]
    command += ["--model", str(model), "--max-new-tokens", "4000"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, log_path)
        token = (root / "data" / "admin_token").read_text().strip()
        children = _children(proc.pid)
        replicas = {}
        for pid in children:
            words = _cmdline(pid).split()
            if "server" in words and "--port" in words:
                replicas[f"{socket.gethostname()}:{words[words.index('--port') + 1]}"] = pid
        assert len(replicas) == 3, children
        url = f"http://127.0.0.1:{port}"
        yield Cluster(proc, url, {"Authorization": f"Bearer {token}"}, replicas, children, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


@pytest.fixture(scope="module")
def adapters(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> list[Adapter]:
    model = cluster.log_path.parent / "model"
    root = tmp_path_factory.mktemp("adapters")
    return [save_adapter(model, root / f"a{i}", 3 + i % 3, seed=60 + i) for i in range(len(TASKS))]


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        yield client


def _body(task: str, **extra: object) -> dict[str, object]:
    return {"task_id": task, "input_ids": [5, 6, 7, 8], "max_new_tokens": 6, "ignore_eos": True, **extra}


def _replica_of(client: httpx.Client, task: str) -> str:
    response = client.post("/generate", json=_body(task))
    assert response.status_code == 200, response.text
    return response.headers["x-replica"]


def test_uploads_through_the_proxy_and_outputs_equal_a_single_servers(
    cluster: Cluster, adapters: list[Adapter], client: httpx.Client
) -> None:
    uploaded_by: Counter[str] = Counter()
    for task, adapter in zip(TASKS, adapters, strict=True):
        files = {"weights": ("a.safetensors", adapter.weights), "config": ("c.json", adapter.config)}
        response = client.put(f"/admin/prefixes/{task}", files=files, headers=cluster.admin_headers)
        assert response.status_code == 201, response.text
        uploaded_by[response.headers["x-replica"]] += 1
    assert len(uploaded_by) == 3  # admin requests go round-robin

    single = f"http://127.0.0.1:{next(iter(cluster.replica_pids)).rsplit(':', 1)[1]}"  # one replica, no proxy
    for task in TASKS:
        proxied = client.post("/generate", json=_body(task)).json()
        direct = httpx.post(single + "/generate", json=_body(task), timeout=60).json()
        assert proxied["token_ids"] == direct["token_ids"] and len(direct["token_ids"]) == 6
        openai = client.post("/v1/completions", json={"model": task, "prompt": [5, 6, 7, 8], "max_tokens": 6})
        assert openai.status_code == 200, openai.text


def test_a_tasks_requests_land_on_one_replica(client: httpx.Client) -> None:
    homes = {}
    for task in TASKS:
        seen = {_replica_of(client, task) for _ in range(4)}
        openai = client.post("/v1/completions", json={"model": task, "prompt": [5, 6], "max_tokens": 2})
        seen.add(openai.headers["x-replica"])
        # the header wins over the body: a client may route by another key
        seen.add(
            client.post("/generate", json=_body("acme:other"), headers={"X-Task-Id": task}).headers[
                "x-replica"
            ]
        )
        assert len(seen) == 1, (task, seen)
        homes[task] = seen.pop()
    assert len(set(homes.values())) >= 2, homes  # the ring spreads tasks over replicas


def test_a_hot_task_spills_over_beyond_the_load_bound(client: httpx.Client) -> None:
    """6 concurrent long generations of one task: the load bound (125% of the mean) sends
    some of them to other replicas instead of queueing all on the task's home."""
    task, replicas = TASKS[0], []

    def one() -> None:
        body = _body(task, max_new_tokens=150, stream=True)
        with client.stream("POST", "/generate", json=body) as response:
            replicas.append(response.headers["x-replica"])
            for _ in response.iter_bytes():
                pass

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # one at a time, so each sees the others in flight
    for thread in threads:
        thread.join(120)
    assert len(replicas) == 6 and len(set(replicas)) >= 2, replicas


def test_the_scale_out_pages_commands_run_against_the_cluster(cluster: Cluster) -> None:
    page = (ROOT / "docs/scale-out.md").read_text()  # tests/readme_runner.py RUN_ELSEWHERE
    cmds = [c.replace("127.0.0.1:8080", "127.0.0.1:8000") for b in page_blocks(page) for c in commands(b)]
    port = int(cluster.url.rsplit(":", 1)[1])
    ran = run_commands(cmds, cluster.log_path.parent, port, clean_env())  # cwd: where data/ is
    assert len(ran) == 4 and failures(ran) == []
    replicas = {line.split(":", 1)[1].strip() for one in ran[2:] for line in one.output.splitlines() if line}
    assert len(replicas) == 1, replicas  # /generate and /v1/completions of one task: one replica


def _health_over(sock: socket.socket) -> bytes:
    """What the proxy answers `GET /health` on an open connection (b"": it closed it unanswered)."""
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sock.settimeout(10)
        return sock.recv(64)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def test_one_address_over_its_connection_limit_is_refused_at_the_proxy_and_others_are_served(
    cluster: Cluster,
) -> None:
    """HAProxy's per-source limits (256 open by default): the 257th connection of one address is
    closed unanswered at accept, while a client of another address (127.0.0.2) is served."""
    port = int(cluster.url.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(256)]
    try:
        time.sleep(0.5)  # the proxy has accepted (and counted) them all
        try:
            over = socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionResetError:
            pass  # closed before the connect call even returned: refused all the same
        else:
            assert _health_over(over) == b""
            over.close()
        other = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
        assert _health_over(other).startswith(b"HTTP/1.1 200")
        other.close()
        assert _health_over(held[0]).startswith(b"HTTP/1.1 200")  # those within the limit work
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10  # the address is served again once its connections closed
    while time.monotonic() < deadline:
        try:
            if _health_over(socket.create_connection(("127.0.0.1", port), timeout=5)).startswith(
                b"HTTP/1.1 200"
            ):
                return
        except ConnectionResetError:
            pass  # still refused
        time.sleep(0.2)
    raise AssertionError("127.0.0.1 still refused after closing its connections")


def _wait_refused(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            pass  # the dead process's listening socket is being torn down: refused next
        time.sleep(0.01)
    raise AssertionError(f"port {port} still accepts connections")


def test_a_killed_replicas_tasks_move_to_the_others_at_once(cluster: Cluster, client: httpx.Client) -> None:
    homes = {task: _replica_of(client, task) for task in TASKS}
    victim = homes[TASKS[0]]
    os.kill(cluster.replica_pids[victim], signal.SIGKILL)
    # until its listening socket is gone, a connection to it still succeeds and the request is
    # lost with it: such a request counts as in flight on the dead replica (it fails cleanly)
    _wait_refused(int(victim.rsplit(":", 1)[1]))
    started = time.monotonic()
    moved = {task: _replica_of(client, task) for task in TASKS}  # every request succeeds
    elapsed = time.monotonic() - started
    print(f"all {len(TASKS)} tasks answered {elapsed:.2f} s after the kill")
    assert elapsed < 2.0  # within the health-check interval x fall: retries redispatch at once
    for task in TASKS:
        if homes[task] == victim:
            assert moved[task] != victim
        else:
            assert moved[task] == homes[task], task  # only the dead replica's tasks move
    time.sleep(2.0)  # the health checks mark it down (the ring loses it); nothing else moves
    after = {task: _replica_of(client, task) for task in TASKS}
    assert victim not in after.values()
    assert all(after[task] == homes[task] for task in TASKS if homes[task] != victim)


def test_a_draining_replica_finishes_its_requests_and_leaves_rotation(
    cluster: Cluster, client: httpx.Client
) -> None:
    """SIGTERM to a replica: the generation running on it completes, and new requests of its task
    get answers elsewhere (with one request in flight on the home, the load bound already sends
    them on; a request that still reaches the draining replica gets a clean 503 + Retry-After)."""
    task = TASKS[0]
    home = _replica_of(client, task)
    tokens: list[int] = []

    def long_generation() -> None:
        body = _body(task, max_new_tokens=400)
        response = client.post("/generate", json=body)
        assert response.status_code == 200 and response.headers["x-replica"] == home
        tokens.extend(response.json()["token_ids"])

    thread = threading.Thread(target=long_generation)
    thread.start()
    time.sleep(0.3)
    os.kill(cluster.replica_pids[home], signal.SIGTERM)
    started, statuses = time.monotonic(), Counter()
    while True:
        response = client.post("/generate", json=_body(task))
        statuses[response.status_code] += 1
        if response.status_code == 200 and response.headers["x-replica"] != home:
            break
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            assert response.headers["retry-after"]
        assert time.monotonic() - started < 5.0, statuses
        time.sleep(0.05)
    print(f"task moved {time.monotonic() - started:.2f} s after SIGTERM; answers meanwhile: {dict(statuses)}")
    thread.join(60)
    assert len(tokens) == 400  # the running generation was not cut


def test_sigterm_stops_every_process(cluster: Cluster) -> None:
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(60) == 0
    assert "cluster: stopped" in cluster.log_path.read_text()
    assert [pid for pid in cluster.child_pids if _is_alive(pid)] == []
