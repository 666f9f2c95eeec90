"""Run the README's shell blocks as a user pastes them, one command at a time.

A command fails on a non-zero exit, an empty answer, or (curl) an HTTP status >= 400. A block
that must not run is fenced as ```bash no-run (rare: e.g. a real model id needing a download).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_STATUS = "__HTTP_STATUS__"


def shell_blocks(readme: str, heading: str) -> list[str]:
    """The ```bash blocks (not marked no-run) of the `## heading` section."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if match is None:
        raise AssertionError(f"README has no section '## {heading}'")
    return re.findall(r"^```bash\n(.*?)^```", match.group(1), re.S | re.M)


def commands(block: str) -> list[str]:
    """Logical commands: continuation lines joined, comment-only and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def _is_assignment(command: str) -> bool:
    return command.startswith("export ") or re.match(r"^[A-Z_]+=", command) is not None


def _talks_to_server(ran: Ran) -> bool:
    return ran.http_status is not None or "prefixctl " in ran.command


@dataclass
class Ran:
    command: str
    returncode: int
    output: str
    http_status: int | None


def run_commands(cmds: list[str], cwd: Path, port: int, env: dict[str, str]) -> list[Ran]:
    """Each command in its own bash, after the assignments seen so far (as a user's shell keeps them)."""
    preamble: list[str] = []
    ran = []
    for raw in cmds:
        command = raw.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        if _is_assignment(command):
            preamble.append(command)
        script = "set -o pipefail\n" + "\n".join(preamble) + "\n"
        if not _is_assignment(command):
            script += re.sub(r"^curl ", f"curl -sS -w '\\n{_STATUS}%{{http_code}}\\n' ", command)
        done = subprocess.run(
            ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        output, status = done.stdout, None
        if _STATUS in output:
            output, _, tail = output.rpartition(_STATUS)
            status = int(tail.strip())
        ran.append(Ran(command, done.returncode, output + done.stderr, status))
    return ran


def failures(ran: list[Ran]) -> list[str]:
    """What went wrong, one line per failed command."""
    bad = []
    for one in ran:
        if one.returncode != 0:
            bad.append(f"exit {one.returncode}: {one.command}\n{one.output[-2000:]}")
        elif one.http_status is not None and one.http_status >= 400:
            bad.append(f"HTTP {one.http_status}: {one.command}\n{one.output[-2000:]}")
        elif _talks_to_server(one) and one.http_status != 204 and not one.output.strip():
            bad.append(f"empty answer: {one.command}")
    return bad
