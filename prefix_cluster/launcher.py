"""Starts one Redis, N `prefix-serve` replicas and HAProxy (`Cluster.start`), and stops them in
reverse (`Cluster.stop`).

Every replica inherits this process's environment (`PREFIX_SERVE_*` included) and the given
replica flags; they share one Redis (embedded under the data dir unless a Redis URL is given) and
one admin token. HAProxy runs this package's haproxy.cfg with the replicas' addresses filled in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from infra.embedded_redis import EmbeddedRedis, free_port, log_tail, terminate
from infra.processes import die_with_parent_hook
from prefix_cluster import ClusterError
from prefix_cluster.haproxy import find_haproxy, loopback_servers, render_config
from server.config import Settings


@dataclass
class Child:
    """One supervised process and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; waits until the process is gone."""
        terminate(self.proc, timeout_s)


def _spawn(name: str, command: list[str], env: dict[str, str], log_path: Path) -> Child:
    log: IO[bytes]
    with log_path.open("ab") as log:
        # its own process group: a terminal's Ctrl-C reaches only us, and we stop children in order
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=die_with_parent_hook(),
        )
    return Child(name, proc, log_path)


@dataclass
class Options:
    """What `prefix-cluster` was asked for."""

    replicas: int
    host: str
    port: int
    data_dir: Path
    redis_url: str | None
    balance: str
    hash_balance_factor: int
    haproxy: str | None
    ready_timeout_s: float
    drain_seconds: float
    replica_flags: list[str]


class Cluster:
    """Starts Redis, the replicas and HAProxy (`start`), and stops them in reverse (`stop`)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.redis: EmbeddedRedis | None = None
        self.replicas: list[Child] = []
        self.ports: list[int] = []
        self.haproxy: Child | None = None
        self.logs = options.data_dir / "logs"

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.options.port}"

    def start(self) -> None:
        """Everything up and every replica answering through HAProxy; raises ClusterError."""
        self.options.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.logs.mkdir(mode=0o700, exist_ok=True)
        env = self._replica_env(self._redis_url())
        for i in range(1, self.options.replicas + 1):
            port = free_port()
            data_dir = self.options.data_dir / "replicas" / f"r{i}"
            command = [sys.executable, "-m", "server", "--port", str(port), "--data-dir", str(data_dir)]
            command += ["--forwarded-allow-ips", "127.0.0.1"]  # HAProxy's X-Forwarded-For names the client
            log = self.logs / f"replica-r{i}.log"
            self.replicas.append(_spawn(f"r{i}", command + self.options.replica_flags, env, log))
            self.ports.append(port)
        self._wait_replicas_ready()
        self._start_haproxy()
        self._wait_proxy_ready()

    def _redis_url(self) -> str:
        if self.options.redis_url:
            return self.options.redis_url
        self.redis = EmbeddedRedis(self.options.data_dir)
        return self.redis.start()

    def _replica_env(self, redis_url: str) -> dict[str, str]:
        """This environment plus the shared Redis and admin token (never on a command line)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", PREFIX_SERVE_REDIS_URL=redis_url)
        env.setdefault("PREFIX_SERVE_DRAIN_SECONDS", str(self.options.drain_seconds))
        settings = Settings.model_validate({"data_dir": self.options.data_dir})
        token, is_new = settings.resolve_admin_token()
        token_file = settings.admin_token_file or self.options.data_dir / "admin_token"
        if not settings.admin_token:  # replicas read the one file (theirs would differ)
            env["PREFIX_SERVE_ADMIN_TOKEN_FILE"] = str(token_file)
        self.admin_token = (token, is_new, token_file, bool(settings.admin_token))
        return env

    def _wait_replicas_ready(self) -> None:
        deadline = time.monotonic() + self.options.ready_timeout_s
        pending = dict(zip(self.ports, self.replicas, strict=True))
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for port, child in list(pending.items()):
                    if child.proc.poll() is not None:
                        raise ClusterError(
                            f"replica {child.name} exited with {child.proc.returncode} "
                            f"(log {child.log_path}):\n{log_tail(child.log_path)}"
                        )
                    try:
                        if client.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                            del pending[port]
                    except httpx.HTTPError:
                        pass
                if time.monotonic() > deadline:
                    names = ", ".join(child.name for child in pending.values())
                    raise ClusterError(
                        f"replicas {names} not ready after {self.options.ready_timeout_s:.0f} s"
                    )
                time.sleep(0.2)

    def _start_haproxy(self) -> None:
        binary, extra_env = find_haproxy(self.options.haproxy)
        config = self.options.data_dir / "haproxy.cfg"
        config.write_text(render_config(loopback_servers(self.ports), self.options.balance))
        env = dict(
            os.environ,
            **extra_env,
            PREFIX_HAPROXY_BIND=f"{self.options.host}:{self.options.port}",
            PREFIX_HASH_BALANCE_FACTOR=str(self.options.hash_balance_factor),
        )
        # -db: foreground, no daemon (we supervise it); -W would fork a master we do not need
        log = self.logs / "haproxy.log"
        self.haproxy = _spawn("haproxy", [binary, "-db", "-f", str(config)], env, log)

    def _wait_proxy_ready(self) -> None:
        """Every replica seen answering through the proxy (admin paths go round-robin)."""
        assert self.haproxy is not None
        deadline = time.monotonic() + 30.0
        seen: set[str] = set()
        with httpx.Client(timeout=2.0) as client:
            while len(seen) < len(self.replicas):
                if self.haproxy.proc.poll() is not None:
                    raise ClusterError(f"haproxy exited:\n{log_tail(self.haproxy.log_path)}")
                try:
                    response = client.get(self.url + "/ready")
                    if response.status_code == 200:
                        seen.add(response.headers.get("x-replica", ""))
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterError(f"not every replica answers through haproxy ({len(seen)} did)")
                time.sleep(0.05)

    def wait(self) -> None:
        """Until HAProxy exits (a replica that dies is reported; HAProxy routes around it)."""
        assert self.haproxy is not None
        reported: set[str] = set()
        while self.haproxy.proc.poll() is None:
            for child in self.replicas:
                if child.proc.poll() is not None and child.name not in reported:
                    reported.add(child.name)
                    print(f"cluster: replica {child.name} exited with {child.proc.returncode}", flush=True)
            time.sleep(0.2)
        raise ClusterError(f"haproxy exited:\n{log_tail(self.haproxy.log_path)}")

    def stop(self) -> None:
        """HAProxy stops listening but finishes what it forwards (SIGUSR1, soft stop) while the
        replicas drain together; then HAProxy, then Redis."""
        if self.haproxy is not None and self.haproxy.proc.poll() is None:
            self.haproxy.proc.send_signal(signal.SIGUSR1)
        for child in self.replicas:
            if child.proc.poll() is None:
                child.proc.terminate()
        for child in self.replicas:
            child.stop(self.options.drain_seconds + 15.0)
        if self.haproxy is not None:
            self.haproxy.stop(2.0)
        if self.redis is not None:
            self.redis.stop()
