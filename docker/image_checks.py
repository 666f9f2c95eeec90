"""The checks `make image-test` runs against containers of the built image (docker/image_test.py)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import safetensors.torch
import torch
from podman_env import Podman

from infra.embedded_redis import free_port

TASK = "demo:hello"
BODY = {"task_id": TASK, "prompt": "Hello", "max_new_tokens": 16}
LONG = 900  # streamed tokens during the stop: the demo model has 1024 positions
# the demo model: 4 layers, 2 (key, value), 4 heads, 6 virtual tokens, head size 32
PREFIX = safetensors.torch.save(
    {"prefix": torch.randn(4, 2, 4, 6, 32, generator=torch.Generator().manual_seed(0))}
)


def wait_ready(url: str, timeout_s: float, alive: Callable[[], str | None]) -> float:
    """Seconds until `url`/ready answers 200; `alive()` returns a reason when the server died."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        dead = alive()
        if dead is not None:
            raise RuntimeError(dead)
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}/ready did not answer 200 within {timeout_s} s")


def upload_and_generate(url: str, token: str) -> list[int]:
    """PUT the prefix, then one greedy generation on it: its token ids."""
    headers = {"Authorization": f"Bearer {token}"}
    files = {"weights": ("p.safetensors", PREFIX, "application/octet-stream")}
    put = httpx.put(f"{url}/admin/prefixes/{TASK}", files=files, headers=headers, timeout=60)
    assert put.status_code == 201, put.text
    return generate(url)


def generate(url: str) -> list[int]:
    answer = httpx.post(url + "/generate", json=BODY, timeout=60)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["token_ids"])


def outside_tokens(host: Any, workdir: Path) -> list[int]:
    """The same upload and generation against `prefix-serve` from .venv (defaults, fresh data dir)."""
    port, data_dir = free_port(), workdir / "outside-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_") and k != "REDIS_URL"}
    serve = str(Path(sys.executable).parent / "prefix-serve")
    proc = host.start([serve, "--port", str(port), "--data-dir", str(data_dir)], workdir / "outside.log", env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 120, lambda: None if proc.poll() is None else (workdir / "outside.log").read_text())
    tokens = upload_and_generate(url, (data_dir / "admin_token").read_text().strip())
    proc.terminate()
    proc.wait(60)
    return tokens


@dataclass
class Running:
    """A started container: its name, its port on the host network, seconds from run to ready."""

    name: str
    port: int
    ready_s: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Checks:
    """Containers of `image` on the host network (this machine's podman has no working bridge)."""

    def __init__(self, podman: Podman, image: str) -> None:
        self.podman = podman
        self.image = image
        self._tokens: dict[str, str] = {}

    def start(self, what: str, volume: str | None = None, env: dict[str, str] | None = None) -> Running:
        name, port = self.podman.name(what), free_port()
        self.podman.containers.append(name)
        settings = {"PREFIX_SERVE_HOST": "127.0.0.1", "PREFIX_SERVE_PORT": str(port),
                    "PREFIX_SERVE_DRAIN_SECONDS": "30", "PREFIX_SERVE_MAX_NEW_TOKENS": str(LONG),
                    **(env or {})}  # fmt: skip
        args = ["run", "-d", "--name", name, "--network", "host"]
        args += [f"--env={k}={v}" for k, v in settings.items()]
        args += ["-v", f"{volume}:/data"] if volume else []
        start = time.monotonic()
        self.podman(*args, self.image)
        wait_ready(f"http://127.0.0.1:{port}", 180, lambda: self._dead(name))
        running = Running(name, port, time.monotonic() - start)
        print(f"ok: {what}: /ready 200 after {running.ready_s:.1f} s", flush=True)
        return running

    def cluster_template(self) -> None:
        """`prefix-cluster` finds its HAProxy template inside the image (package data, not the
        repository's file): it renders the DNS-discovery config that HAProxy's own container runs."""
        config = self.podman("run", "--rm", self.image, "prefix-cluster", "--render-dns", "replica:8000")
        assert 'server-template replica 10 "replica:8000"' in config, config[-2000:]
        print("ok: prefix-cluster renders its HAProxy config inside the image", flush=True)

    def _dead(self, name: str) -> str | None:
        state = self.podman("inspect", "--format", "{{.State.Status}}", name, check=False).strip()
        return None if state == "running" else f"container {name} is {state}:\n{self.logs(name)[-3000:]}"

    def logs(self, name: str) -> str:
        done = subprocess.run(["podman", "logs", name], env=self.podman.env, capture_output=True, text=True)
        return done.stdout + done.stderr

    def json_logs(self, name: str, secret: str) -> None:
        """Every line the container wrote is JSON, and `secret` (the admin token) is in none."""
        lines = self.logs(name).splitlines()
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                raise AssertionError(f"a log line of {name} is not JSON: {line[:300]!r}") from None
        assert secret not in "\n".join(lines), "the admin token is in the container log"
        print(f"ok: {len(lines)} log lines, all JSON, no admin token among them", flush=True)

    def token(self, running: Running) -> str:
        """The admin token the server generated (read from its data volume while it runs)."""
        if running.name not in self._tokens:
            self._tokens[running.name] = self.podman("exec", running.name, "cat", "/data/admin_token").strip()
        return self._tokens[running.name]

    def first_start(self, running: Running) -> None:
        uid = self.podman("exec", running.name, "id", "-u").strip()
        pid = self.podman("inspect", "--format", "{{.State.Pid}}", running.name).strip()
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        host_uid = next(line for line in status if line.startswith("Uid:"))
        assert uid == "10001" and host_uid.split()[1] == "10001", (uid, host_uid)
        print(f"ok: the server runs as uid {uid}, not root (host view: {host_uid.split()[1]})", flush=True)
        self.podman("healthcheck", "run", running.name)
        print("ok: podman healthcheck run: healthy (the image's HEALTHCHECK)", flush=True)
        mode = self.podman("exec", running.name, "stat", "-c", "%a", "/data/admin_token").strip()
        assert mode == "600", mode
        self.json_logs(running.name, self.token(running))

    def upload_and_generate(self, running: Running) -> list[int]:
        return upload_and_generate(running.url, self.token(running))

    def stop(self, running: Running, grace_s: int = 45) -> tuple[float, int]:
        start = time.monotonic()
        self.podman("stop", "-t", str(grace_s), running.name, timeout=grace_s + 60)
        took = time.monotonic() - start
        code = int(self.podman("inspect", "--format", "{{.State.ExitCode}}", running.name).strip())
        return took, code

    def stop_drains(self, running: Running, grace_s: int) -> None:
        """`podman stop` while a stream runs: it completes, and the exit comes within the grace."""
        events: list[Any] = []
        ended: list[float] = []
        first = threading.Event()
        body = {**BODY, "max_new_tokens": LONG, "ignore_eos": True, "stream": True}

        def read() -> None:
            with httpx.stream("POST", running.url + "/generate", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                        first.set()
            ended.append(time.monotonic())

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60), "the stream did not start"
        self.token(running)  # read now: the container is gone after the stop
        stopping = time.monotonic()
        took, code = self.stop(running, grace_s)
        reader.join(120)
        assert ended and ended[0] > stopping, "the stream ended before the stop: nothing was drained"
        assert events and events[-1] == "[DONE]", f"the stream was cut: {events[-2:]}"
        tokens = sum(len(e["token_ids"]) for e in events[:-1])
        assert events[-2].get("finish_reason") == "length" and tokens == LONG, (events[-2], tokens)
        assert took < grace_s and code != 137, f"stop took {took:.1f} s, exit {code} (killed?)"
        self.json_logs(running.name, self.token(running))  # the drain and exit wrote JSON too
        print(f"ok: podman stop drained: the {LONG}-token stream completed, exit {code} after "
              f"{took:.1f} s (grace {grace_s} s)", flush=True)  # fmt: skip

    def prefix_kept(self, running: Running, reference: list[int]) -> None:
        headers = {"Authorization": f"Bearer {self.token(running)}"}
        listed = httpx.get(f"{running.url}/admin/prefixes/{TASK}", headers=headers, timeout=30)
        assert listed.status_code == 200, listed.text
        assert generate(running.url) == reference
        print("ok: after a restart on the same volume the prefix is there (same tokens)", flush=True)

    def external_redis(self, redis_url: str, reference: list[int]) -> None:
        """As compose runs it: REDIS_URL and PREFIX_ADMIN_TOKEN from the environment, no volume."""
        import redis

        env = {"REDIS_URL": redis_url, "PREFIX_ADMIN_TOKEN": secrets.token_urlsafe(24)}
        running = self.start("external-redis", env=env)
        assert upload_and_generate(running.url, env["PREFIX_ADMIN_TOKEN"]) == reference
        keys = redis.Redis.from_url(redis_url).dbsize()
        assert keys > 0, "nothing was written to the external Redis"
        self.json_logs(running.name, env["PREFIX_ADMIN_TOKEN"])
        self.stop(running)
        fresh = self.start("external-redis-2", env=env)  # another container, no volume
        assert generate(fresh.url) == reference
        self.stop(fresh)
        print(f"ok: external Redis ({keys} keys): a second container without a volume serves the prefix",
              flush=True)  # fmt: skip
