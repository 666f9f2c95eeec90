"""`prefix-cluster`: one Redis, N `prefix-serve` replicas and HAProxy in front, on one box.

For trying scale-out and for tests; production runs the same pieces with compose or Kubernetes
(docker/). Every replica inherits this process's environment (`PREFIX_SERVE_*` included) and the
flags after `--`; they share one Redis (embedded under `--data-dir` unless `--redis-url`) and one
admin token. HAProxy uses the repository's docker/haproxy/haproxy.cfg with the replicas'
addresses filled in. SIGTERM or Ctrl-C stops HAProxy, drains the replicas, then stops Redis.
One replica is taken out for maintenance, and back, at its own port: `prefixctl --url
http://127.0.0.1:<port> drain --wait` / `undrain` (it prints the commands).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import httpx

from infra.embedded_redis import EmbeddedRedis, free_port, log_tail, terminate
from infra.processes import die_with_parent_hook
from server.config import Settings
from server.logs import announce_admin_token

ROOT = Path(__file__).resolve().parents[1]
CONFIG_TEMPLATE = ROOT / "docker" / "haproxy" / "haproxy.cfg"
SERVERS_MARK = "    #@servers"
HASH_BALANCE = "    balance hash var(txn.task_id)"


class ClusterError(RuntimeError):
    """Something did not start; the message says what and where its log is."""


class _Stop(Exception):
    """Raised from the SIGTERM/SIGINT handler to leave the wait loop."""


def render_config(servers: list[str], balance: str = "hash", template: Path = CONFIG_TEMPLATE) -> str:
    """The HAProxy config: `servers` (config lines, without indent) at each `#@servers` mark;
    `balance="roundrobin"` swaps task-affinity hashing for round-robin (the benchmark's baseline)."""
    text = template.read_text()
    if SERVERS_MARK not in text or HASH_BALANCE not in text:
        raise ClusterError(f"{template} lacks the `#@servers` mark or the hash `balance` line")
    if balance == "roundrobin":
        text = text.replace(HASH_BALANCE, "    balance roundrobin")
    elif balance != "hash":
        raise ValueError(f"balance must be hash or roundrobin, not {balance!r}")
    return text.replace(SERVERS_MARK, "\n".join("    " + line for line in servers))


def loopback_servers(ports: list[int]) -> list[str]:
    """One `server` line per replica (health checks come from `default-server`)."""
    return [f"server r{i} 127.0.0.1:{port}" for i, port in enumerate(ports, start=1)]


def dns_servers(address: str, slots: int) -> list[str]:
    """Up to `slots` replicas found by resolving `address` (host:port) through the `dns`
    resolvers section: Docker's embedded DNS or a Kubernetes headless Service."""
    return [f'server-template replica {slots} "{address}" resolvers dns init-addr none']


def find_haproxy(given: str | None = None) -> tuple[str, dict[str, str]]:
    """The haproxy binary and the environment it needs: `given`, else PATH, else the Debian package
    `make haproxy` unpacked under the venv (its Lua/OpenTracing libraries next to it)."""
    if given:
        return given, {}
    found = shutil.which("haproxy")
    if found:
        return found, {}
    unpacked = Path(sys.prefix) / "haproxy"
    binary = unpacked / "usr" / "sbin" / "haproxy"
    if binary.exists():
        libs = [str(p) for p in (unpacked / "usr" / "lib").glob("*-linux-gnu")]
        paths = [*libs, os.environ.get("LD_LIBRARY_PATH", "")]
        return str(binary), {"LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p)}
    raise ClusterError("no haproxy: run `make haproxy` (Debian's package under .venv) or install it")


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


def parse_args(argv: list[str]) -> Options | tuple[str, int]:
    """Options, or (address, slots) for `--render-dns`; flags after `--` go to every replica."""
    ours, replica_flags = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = argparse.ArgumentParser(
        prog="prefix-cluster",
        description="One Redis, N prefix-serve replicas and HAProxy (task affinity, bounded loads).",
        epilog="Flags after `--` go to every replica, e.g. `prefix-cluster --replicas 3 -- --model gpt2`.",
    )
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--host", default="127.0.0.1", help="HAProxy's listen address")
    parser.add_argument("--port", type=int, default=8080, help="HAProxy's port")
    parser.add_argument("--data-dir", type=Path, default=Path("./data"), help="Redis, replicas' dirs, logs")
    parser.add_argument("--redis-url", default=None, help="default: an embedded Redis under --data-dir")
    parser.add_argument("--balance", choices=("hash", "roundrobin"), default="hash")
    parser.add_argument(
        "--hash-balance-factor", type=int, default=125, help="load bound in %% of the mean; 0: off"
    )
    parser.add_argument("--haproxy", default=None, help="haproxy binary; default: PATH, else make haproxy's")
    parser.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds replicas may take to load"
    )
    parser.add_argument("--drain-seconds", type=float, default=30.0, help="replicas' drain on stop")
    parser.add_argument("--render-dns", metavar="HOST:PORT", help="print the config for DNS discovery, exit")
    parser.add_argument("--dns-slots", type=int, default=10, help="with --render-dns: most replicas")
    args = parser.parse_args(ours)
    if args.render_dns:
        return args.render_dns, args.dns_slots
    if args.replicas < 1 or not 0 <= args.hash_balance_factor <= 10000 or 0 < args.hash_balance_factor < 100:
        parser.error("--replicas must be >= 1 and --hash-balance-factor 0 or 100..10000")
    return Options(
        args.replicas,
        args.host,
        args.port,
        args.data_dir.expanduser().resolve(),
        args.redis_url,
        args.balance,
        args.hash_balance_factor,
        args.haproxy,
        args.ready_timeout,
        args.drain_seconds,
        replica_flags,
    )


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def main(argv: list[str] | None = None) -> None:
    parsed = parse_args(sys.argv[1:] if argv is None else argv)
    if isinstance(parsed, tuple):
        header = (
            f"# Generated by `python -m server.cluster --render-dns '{parsed[0]}' --dns-slots {parsed[1]}`\n"
        )
        print(header + render_config(dns_servers(*parsed)), end="")
        return
    cluster = Cluster(parsed)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        cluster.start()
        for child, port in zip(cluster.replicas, cluster.ports, strict=True):
            print(f"cluster: replica {child.name} http://127.0.0.1:{port} (log {child.log_path})", flush=True)
        print(
            "cluster: maintenance of a replica (its port, not the proxy's; admin token):\n"
            f"  prefixctl --url http://127.0.0.1:{cluster.ports[0]} drain --wait   # out of rotation, "
            "in-flight work done\n"
            f"  prefixctl --url http://127.0.0.1:{cluster.ports[0]} undrain        # back in rotation",
            flush=True,
        )
        announce_admin_token(*cluster.admin_token)  # a new token only on a terminal, never in a log
        print(f"cluster ready: {cluster.url}", flush=True)
        cluster.wait()
    except _Stop:
        print("cluster: stopping", flush=True)
    except ClusterError as exc:
        print(f"prefix-cluster: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the stop short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cluster.stop()
        print("cluster: stopped", flush=True)


if __name__ == "__main__":
    main()
