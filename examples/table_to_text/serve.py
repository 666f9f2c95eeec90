"""Start `prefix-serve` (demo model, embedded Redis, a throw-away data dir) for the examples."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from infra.embedded_redis import free_port


@dataclass(frozen=True)
class Server:
    url: str
    admin_token: str


@contextlib.contextmanager
def demo_server(*flags: str, timeout_s: float = 120.0) -> Iterator[Server]:
    """A server on a free port until the block ends; its log goes to the data dir."""
    with tempfile.TemporaryDirectory(prefix="prefix-demo-") as tmp:
        data, port = Path(tmp) / "data", free_port()
        log = (Path(tmp) / "server.log").open("wb")
        cmd = [sys.executable, "-m", "server", "--port", str(port), "--data-dir", str(data), *flags]
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((Path(tmp) / "server.log").read_text()[-3000:])
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/ready", timeout=1).status_code == 200:
                        break
                time.sleep(0.3)
            yield Server(url, (data / "admin_token").read_text().strip())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
