"""Real Redis topologies on loopback for tests and benches: Sentinel (primary + replica + 3
sentinels) and Cluster (3 primaries). Redis >= 7 from PATH (sharded pub/sub needs 7)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from infra.embedded_redis import free_port, terminate, wait_until_ready


def redis7_server() -> str | None:
    """Path of a redis-server >= 7 on PATH, or None."""
    path = shutil.which("redis-server")
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    version = out.split("v=")[1].split()[0] if "v=" in out else "0"
    return path if int(version.split(".")[0]) >= 7 else None


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (both must be below 65536)."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisProcs:
    """Redis child processes in one temp dir; `close()` kills them all."""

    def __init__(self, prefix: str) -> None:
        binary = redis7_server()
        if binary is None:
            raise RuntimeError(
                "these tests need redis-server >= 7 on PATH (Debian: apt install redis-server)"
            )
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}  # port -> process

    def spawn(self, name: str, args: list[str], port: int | None = None, wait: bool = True) -> int:
        port = port or free_port()
        workdir = self.dir / name
        workdir.mkdir(exist_ok=True)
        log_path = workdir / "redis.log"
        command = [self.binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
        command += ["--logfile", str(log_path), "--save", "", "--daemonize", "no"]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[port] = proc
        if wait:
            wait_until_ready(proc, port, log_path)
        return port

    def kill(self, port: int) -> None:
        """SIGKILL, like a crash."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def close(self) -> None:
        for proc in self.procs.values():
            terminate(proc, timeout_s=2.0)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSetup(RedisProcs):
    """One primary, one replica, three sentinels watching service `mymaster`."""

    SERVICE = "mymaster"

    def __init__(self, down_after_ms: int = 1000) -> None:
        super().__init__("test-sentinel-")
        fast_sync = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        self.primary = self.spawn("primary", fast_sync)
        self.replica = self.spawn("replica", [*fast_sync, "--replicaof", "127.0.0.1", str(self.primary)])
        self.sentinels: list[int] = []
        for i in range(3):
            conf = self.dir / f"sentinel{i}.conf"
            conf.write_text(
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} {down_after_ms}\n"
                f"sentinel failover-timeout {self.SERVICE} 10000\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n"
            )
            self.sentinels.append(self.spawn(f"s{i}", [str(conf), "--sentinel"]))
        self.wait_synced()

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def wait_synced(self, timeout_s: float = 20.0) -> None:
        """Until the replica is online and every sentinel knows it and its peers."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with redis.Redis(port=self.primary) as primary:
                info = primary.info("replication")
            online = "online" in str(info.get("slave0", ""))
            known = all(self._sentinel_view(port) for port in self.sentinels)
            if online and known:
                return
            time.sleep(0.1)
        raise RuntimeError("the replica or the sentinels did not settle in time")

    def _sentinel_view(self, port: int) -> bool:
        with redis.Redis(port=port, decode_responses=True) as sentinel:
            master = sentinel.execute_command("SENTINEL", "MASTER", self.SERVICE)
        fields = dict(zip(master[::2], master[1::2], strict=True)) if isinstance(master, list) else master
        return int(fields["num-slaves"]) >= 1 and int(fields["num-other-sentinels"]) >= 2

    def current_primary(self) -> int:
        with redis.Redis(port=self.sentinels[0], decode_responses=True) as sentinel:
            _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        return int(port)


class ClusterSetup(RedisProcs):
    """`num_primaries` cluster nodes, no replicas; slots split evenly by `redis-cli --cluster create`.
    `cluster-require-full-coverage no`: a dead primary's slots fail, the others keep serving."""

    def __init__(self, num_primaries: int = 3, replicas_per_primary: int = 0) -> None:
        super().__init__("test-cluster-")
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no"]
        args += ["--appendonly", "no", "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        num_nodes = num_primaries * (1 + replicas_per_primary)
        self.ports = [self.spawn(f"n{i}", args, port=cluster_port()) for i in range(num_nodes)]
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is needed to create a cluster")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                str(replicas_per_primary),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.wait_ok()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def wait_ok(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = []
            for port in self.ports:
                with redis.Redis(port=port, decode_responses=True) as node:
                    states.append(node.cluster("info")["cluster_state"])
            if all(state == "ok" for state in states):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok in time")

    def slots_of(self, port: int) -> set[int]:
        """The slots node `port` serves."""
        with redis.Redis(port=port, decode_responses=True) as node:
            ranges = node.execute_command("CLUSTER", "SLOTS")
        owned: set[int] = set()
        for start, end, primary, *_ in ranges:
            if int(primary[1]) == port:
                owned.update(range(int(start), int(end) + 1))
        return owned
