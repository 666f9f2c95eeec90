"""Podman on a machine without Docker, as `make image-test` needs it (see docker/image_test.py).

What this machine needs, found by running it (issue 17): Debian's podman packages; runc rather
than crun (crun refuses hybrid cgroups) and explicit ulimits (the defaults need CAP_SYS_RESOURCE),
given through a private CONTAINERS_CONF, so /etc is left alone; a base image made with mmdebstrap
(no registry image is reachable) plus the machine's extra CA certificates, so pip in the build
reaches PyPI the way the host does; and torch's CPU wheel served from a tiny local PEP 503 index.
Everything made here is tracked by `Podman` and removed by `Podman.cleanup()`.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

APT_PACKAGES = (
    "podman buildah runc fuse-overlayfs slirp4netns uidmap mmdebstrap netavark aardvark-dns conmon".split()
)
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]
[engine]
runtime = "runc"
"""
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
TORCH = "torch==2.13.0"  # pyproject's pin


class SetupError(RuntimeError):
    """Podman or the base image cannot be made here; the message says what to do."""


def ensure_podman() -> str:
    """`podman` on PATH, installed from apt when missing (root and a reachable Debian mirror)."""
    missing = [tool for tool in ("podman", "mmdebstrap", "runc") if shutil.which(tool) is None]
    if not missing:
        return "already installed"
    install = ["apt-get", "install", "-y", "-q", *APT_PACKAGES]
    if subprocess.run(install, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True)
        done = subprocess.run(install, capture_output=True, text=True)
        if done.returncode != 0:
            raise SetupError(
                f"podman is missing ({', '.join(missing)}) and `{' '.join(install)}` failed "
                f"(root and a Debian mirror are needed):\n{done.stderr[-2000:]}"
            )
    return "installed from apt: " + " ".join(APT_PACKAGES)


class Podman:
    """`podman` with a private config under `workdir`; remembers what it made, removes it all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.run_id = "prefix-imgtest-" + uuid.uuid4().hex[:8]
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.images_before = set(self._image_ids())
        self.volumes_before = set(self._volume_names())
        self.tags: list[str] = []
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def __call__(self, *args: str, check: bool = True, timeout: float = 900) -> str:
        done = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done.stdout

    def name(self, what: str) -> str:
        """A unique name for a container or volume of this run."""
        return f"{self.run_id}-{what}"

    def tag(self, what: str) -> str:
        tag = f"localhost/{self.run_id}-{what}:latest"
        self.tags.append(tag)
        return tag

    def volume(self, what: str) -> str:
        name = self.name(what)
        self("volume", "create", name)
        self.volumes.append(name)
        return name

    def _image_ids(self) -> list[str]:
        return self("images", "-a", "-q", "--no-trunc", check=False).split()

    def _volume_names(self) -> list[str]:
        return self("volume", "ls", "-q", check=False).split()

    def cleanup(self, keep_images: bool = False) -> list[str]:
        """Remove this run's containers, volumes, tags and any image layer the run created
        (the images stay with `keep_images`: what is left then is the list of their tags)."""
        for container in self.containers:
            self("rm", "-f", "-v", "-t", "0", container, check=False)  # -v: its anonymous volumes
        for volume in self.volumes + sorted(set(self._volume_names()) - self.volumes_before):
            self("volume", "rm", "-f", volume, check=False)
        if keep_images:
            return list(self.tags)
        for tag in reversed(self.tags):
            self("rmi", "-f", tag, check=False)
        for image in set(self._image_ids()) - self.images_before:  # dangling build stages
            self("rmi", "-f", image, check=False)
        return self.leftovers()

    def leftovers(self) -> list[str]:
        """What of this run is still there (should be nothing after cleanup)."""
        listings = [("ps", "-a", "--format", "{{.Names}}"), ("volume", "ls", "-q"),
                    ("images", "--format", "{{.Repository}}")]  # fmt: skip
        left = [x for args in listings for x in self(*args, check=False).split() if self.run_id in x]
        left += sorted(set(self._image_ids()) - self.images_before)
        left += sorted(set(self._volume_names()) - self.volumes_before - set(left))
        return left


def build_base(podman: Podman) -> str:
    """A Debian bookworm image with python3 (mmdebstrap), plus this machine's extra CA certificates
    and PIP_CERT (so pip inside the build trusts what the host trusts). Returns its tag."""
    rootfs = podman.workdir / "rootfs.tar"
    packages = "python3,python3-venv,python-is-python3,ca-certificates"
    done = subprocess.run(
        ["mmdebstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(rootfs)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SetupError(f"mmdebstrap failed (a Debian mirror is needed):\n{done.stderr[-2000:]}")
    plain = podman.tag("debian-python")
    podman("import", "-q", str(rootfs), plain)
    rootfs.unlink()
    context = podman.workdir / "base-context"
    (context / "certs").mkdir(parents=True)
    for cert in sorted(EXTRA_CA_DIR.glob("*.crt")):
        shutil.copy(cert, context / "certs" / cert.name)
    (context / "Containerfile").write_text(
        f"FROM {plain}\n"
        "COPY certs/ /usr/local/share/ca-certificates/\n"
        "RUN update-ca-certificates >/dev/null\n"
        "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt\n"
    )
    base = podman.tag("base")
    podman("build", "-q", "--format", "docker", "--network", "host", "-t", base, str(context))
    return base


class TorchIndex:
    """A PEP 503 index on 127.0.0.1: `torch` is the CPU wheel already on this machine, every other
    name redirects to PyPI. Used as the Dockerfile's TORCH_INDEX; None when the wheel is not here."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "torch-index"
        self.dir.mkdir()
        self.url: str | None = None
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> str | None:
        # --no-index: only the machine's find-links (PIP_FIND_LINKS, pip.conf); never a download
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-index", "--no-deps", "--only-binary=:all:",
             TORCH, "-d", str(self.dir)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        wheels = sorted(self.dir.glob("torch-*+cpu-*.whl"))
        if done.returncode != 0 or not wheels:
            return None
        wheel = wheels[0].name
        handler = _index_handler(self.dir, wheel)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/simple"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _index_handler(root: Path, wheel: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            parts = self.path.strip("/").split("/")
            if parts[:1] == ["simple"] and len(parts) == 2 and parts[1] == "torch":
                body = f'<html><body><a href="/{wheel}">{wheel}</a></body></html>'.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif parts[:1] == ["simple"] and len(parts) == 2:
                self.send_response(302)
                self.send_header("Location", f"https://pypi.org/simple/{parts[1]}/")
                self.end_headers()
            else:
                super().do_GET()  # the wheel file

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler


@contextlib.contextmanager
def timed(timings: dict[str, float], what: str):  # type: ignore[no-untyped-def]
    """Record how long the block took under `what` (seconds)."""
    start = time.monotonic()
    yield
    timings[what] = time.monotonic() - start
