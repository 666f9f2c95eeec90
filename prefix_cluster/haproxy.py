"""The HAProxy config from this package's template, and the haproxy binary to run it with."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from prefix_cluster import ClusterError

CONFIG_TEMPLATE = Path(__file__).with_name("haproxy.cfg")
SERVERS_MARK = "    #@servers"
HASH_BALANCE = "    balance hash var(txn.task_id)"


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
