"""`make image-test`: build the image with podman on this machine and run it for real.

Checks: /ready answers; the server runs as a non-root user; the HEALTHCHECK passes; every log
line is JSON and no admin token is in the log; a prefix upload plus a generation inside the
container give the same tokens as `prefix-serve` from .venv outside it; `podman stop` drains (a
running stream completes, the exit comes within the grace period) and the data volume keeps the
prefix across a container restart; against an external Redis (REDIS_URL, as docker-compose.yml
runs it) the prefix lives in that Redis. Prints timings and the image's size. Leaves nothing
behind: everything is made under a temp dir and in podman names of this run, removed at the end.
Several minutes, most of it the image build (pip inside the build).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from image_checks import Checks, outside_tokens
from podman_env import Podman, SetupError, TorchIndex, build_base, ensure_podman, timed

from infra.embedded_redis import free_port

ROOT = Path(__file__).resolve().parents[1]
# what the Dockerfile copies
CONTEXT = ["Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "server", "prefix_store",
           "clients", "trainer"]  # fmt: skip
GRACE_S = 45  # docker-compose.yml's stop_grace_period (its drain is 30 s)


def copy_context(dest: Path) -> Path:
    """The build context: the working tree's files the Dockerfile needs, as `docker build .` sees
    them (uncommitted edits and new files included; nothing git ignores: no caches, no data/),
    copied so that the build never writes into the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *CONTEXT],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def build_image(podman: Podman, base: str, torch_index: str | None) -> str:
    context = copy_context(podman.workdir / "context")
    image = podman.tag("server")
    args = ["build", "--format", "docker", "--network", "host", "--layers=false", "-t", image,
            "--build-arg", f"BASE={base}"]  # fmt: skip
    if torch_index is not None:
        args += ["--build-arg", f"TORCH_INDEX={torch_index}"]
    podman(*args, str(context), timeout=1800)
    return image


def build(podman: Podman, index: TorchIndex, timings: dict[str, float]) -> str:
    """The base image, then the project's image on it; returns its tag."""
    with timed(timings, "base image (mmdebstrap + import + CA layer)"):
        base = build_base(podman)
    torch_index = index.start()
    print(f"torch index: {torch_index or 'the Dockerfile default (no CPU wheel here)'}", flush=True)
    with timed(timings, "image build"):
        image = build_image(podman, base, torch_index)
    print(f"built {image}", flush=True)
    return image


def image_weight(podman: Podman, image: str) -> list[str]:
    """The image's size, its biggest layers and the biggest packages in its virtualenv."""
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).strip())
    lines = [f"image size: {size / 1e9:.2f} GB ({size} bytes)"]
    history = podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image).splitlines()
    big = [f"  {h[:110]}" for h in history if h.split("\t")[0].endswith(("MB", "GB"))]
    lines += ["layers (biggest):", *big]
    name = podman.name("du")
    podman.containers.append(name)
    du = podman("run", "--rm", "--name", name, "--network", "host", image, "sh", "-c",
                "du -sm /opt/venv/lib/python3*/site-packages/* | sort -n | tail -8; "
                "du -sm /opt/venv/lib/python3*/site-packages/torch/lib")  # fmt: skip
    return lines + ["site-packages (MB, biggest):"] + [f"  {line}" for line in du.splitlines()]


class HostProcesses:
    """Processes this run starts on the host (the outside server, an external Redis): all stopped."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, command: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=out, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def external_redis(host: HostProcesses, workdir: Path) -> str:
    """A redis-server on a free loopback port (the stand-in for compose's `redis` service)."""
    binary = shutil.which("redis-server") or str(Path(sys.executable).parent / "redis-server")
    port = free_port()
    host.start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
               workdir / "redis.log")  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(port=port).ping()
            return url
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "the external redis-server did not start"
            time.sleep(0.2)


def run_checks(podman: Podman, image: str, host: HostProcesses, timings: dict[str, float]) -> None:
    checks = Checks(podman, image)
    checks.cluster_template()
    reference = outside_tokens(host, podman.workdir)
    print(f"outside the container (prefix-serve from .venv): {reference}", flush=True)
    volume = podman.volume("data")
    first = checks.start("first", volume=volume)
    timings["start to ready (first start, empty volume)"] = first.ready_s
    checks.first_start(first)
    assert checks.upload_and_generate(first) == reference, "the container's tokens differ from outside"
    print("ok: prefix upload + generation inside = outside (same tokens)", flush=True)
    checks.stop_drains(first, GRACE_S)
    again = checks.start("restart", volume=volume)
    timings["start to ready (restart, same volume)"] = again.ready_s
    checks.prefix_kept(again, reference)
    checks.stop(again)
    redis_url = external_redis(host, podman.workdir)
    checks.external_redis(redis_url, reference)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build the image with podman and run it for real.")
    parser.add_argument("--image", help="check this existing image instead of building one (it is kept)")
    parser.add_argument(
        "--keep-image", action="store_true", help="keep the images built (for reruns with --image)"
    )
    return parser.parse_args()


def main() -> int:
    options = parse_args()
    timings: dict[str, float] = {}
    try:
        print(f"podman: {ensure_podman()}", flush=True)
    except SetupError as exc:
        print(f"image-test: cannot run: {exc}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="prefix-image-test-"))
    podman = Podman(workdir)
    index = TorchIndex(workdir)
    host = HostProcesses()
    failed = False
    try:
        image = options.image or build(podman, index, timings)
        weight = image_weight(podman, image)
        print("\n".join(weight), flush=True)
        run_checks(podman, image, host, timings)
    except Exception as exc:  # reported, then everything made is removed all the same
        failed = True
        print(f"image-test: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        host.stop_all()
        index.stop()
        left = podman.cleanup(keep_images=options.keep_image)
        shutil.rmtree(workdir, ignore_errors=True)
    for what, seconds in timings.items():
        print(f"time: {what}: {seconds:.1f} s")
    if options.keep_image:
        print(f"kept (remove with `podman rmi`): {' '.join(left)}")
    elif left:
        print(f"image-test: left behind: {left}", file=sys.stderr)
        return 1
    else:
        print("nothing left behind (containers, volumes, images of this run, host processes, temp dir)")
    if failed:
        return 1
    print("image-test: PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
