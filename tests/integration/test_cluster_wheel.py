"""`prefix-cluster` from an installed wheel, run outside the checkout: the wheel carries the HAProxy
template and the demo model, 2 replicas come up behind HAProxy, answer through it, and stop."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from infra.embedded_redis import free_port
from prefix_cluster import ClusterError
from prefix_cluster.haproxy import find_haproxy
from tests.server_process import ROOT, clean_env


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the installed wheel (packages and `bin/prefix-cluster`), built from a copy of
    the packages pyproject.toml lists, as the Dockerfile copies them: nothing else of the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    source = root / "src"
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        name = pattern.rstrip("*")
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)], root)
    (wheel,) = (root / "dist").glob("*.whl")
    _run([*pip, "install", "--no-deps", "--no-compile", "--target", str(root / "site"), str(wheel)], root)
    return root / "site"


def test_prefix_cluster_from_the_wheel_starts_2_replicas_outside_the_checkout(
    installed: Path, tmp_path: Path
) -> None:
    try:
        find_haproxy()
    except ClusterError as exc:
        pytest.skip(f"no HAProxy here ({exc}): `make haproxy` could not fetch Debian's package")
    env = clean_env({"PYTHONPATH": str(installed)})
    where = "import prefix_cluster.haproxy as h, server; print(h.CONFIG_TEMPLATE, server.__file__)"
    found = subprocess.run([sys.executable, "-c", where], cwd=tmp_path, env=env, capture_output=True)
    # the wheel's files, not the checkout's
    template, server = (Path(p) for p in found.stdout.decode().split())
    assert template.is_file() and template.is_relative_to(installed) and server.is_relative_to(installed)
    port, log_path = free_port(), tmp_path / "cluster.log"
    command = [str(installed / "bin" / "prefix-cluster"), "--replicas", "2", "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "data"), "--drain-seconds", "1"]  # the demo model
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "cluster ready:" not in (text := log_path.read_text(errors="replace")):
            assert proc.poll() is None and time.monotonic() < deadline, text[-4000:]
            time.sleep(0.2)
        assert "server r2 127.0.0.1:" in (tmp_path / "data" / "haproxy.cfg").read_text()
        url = f"http://127.0.0.1:{port}"
        admin = {"Authorization": f"Bearer {(tmp_path / 'data' / 'admin_token').read_text().strip()}"}
        put = httpx.put(f"{url}/admin/prefixes/demo:t", files={"text": (None, "Be brief.")}, headers=admin)
        assert put.status_code == 201, put.text
        body = {"task_id": "demo:t", "prompt": "Hi", "max_new_tokens": 4}
        answer = httpx.post(f"{url}/generate", json=body, timeout=30)
        assert answer.status_code == 200 and answer.headers["x-replica"], answer.text
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(60)
    text = log_path.read_text(errors="replace")
    assert returncode == 0 and "cluster: stopped" in text, text[-4000:]
