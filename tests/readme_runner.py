"""Run the shell blocks of the README and of docs/*.md as a user pastes them, one command at a time.

A command fails on a non-zero exit, an empty answer, or (curl) an HTTP status >= 400. A block
that must not run is fenced as ```bash no-run (rare: e.g. a real model id needing a download).

Which page runs where: `SESSIONS` lists the pages whose blocks run against one server started
with the defaults (tests/integration/test_readme.py), in order; `RUN_ELSEWHERE` the pages
another test runs (against what they need, e.g. a cluster). Every page with a runnable block
must be in one of them (tests/test_readme_runner.py checks it).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.server_process import ROOT

_STATUS = "__HTTP_STATUS__"
_VARS = "__SHELL_VARS__"

# Pages of one session share one server and one working directory and run in this order; each
# page starts with no shell variables (as in a new terminal), so it must set its own.
SESSIONS: dict[str, tuple[str, ...]] = {
    "readme": ("README.md",),
    # tenants.md last: its first API key closes the server's development mode for good
    "docs": ("docs/clients.md", "docs/tenants.md"),
}
RUN_ELSEWHERE = {"docs/scale-out.md": "tests/integration/test_cluster.py"}  # needs a cluster


def doc_pages() -> list[Path]:
    """The README and every docs page."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_blocks(readme: str, heading: str) -> list[str]:
    """The ```bash blocks (not marked no-run) of the `## heading` section."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if match is None:
        raise AssertionError(f"README has no section '## {heading}'")
    return re.findall(r"^```bash\n(.*?)^```", match.group(1), re.S | re.M)


def page_blocks(page: str) -> list[str]:
    """Every ```bash block of a whole page, not marked no-run."""
    return re.findall(r"^```bash\n(.*?)^```", page, re.S | re.M)


def commands(block: str) -> list[str]:
    """Logical commands: continuation lines joined, comment-only and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def _is_assignment(command: str) -> bool:
    return command.startswith("export ") or re.match(r"^[A-Z_]+=", command) is not None


def _assigned_names(command: str) -> list[str]:
    return re.findall(r"(?:^|\s)(?:export\s+)?([A-Za-z_]\w*)=", command)


def _talks_to_server(ran: Ran) -> bool:
    return ran.http_status is not None or "prefixctl " in ran.command


@dataclass
class Ran:
    command: str
    returncode: int
    output: str
    http_status: int | None


def run_commands(cmds: list[str], cwd: Path, port: int, env: dict[str, str]) -> list[Ran]:
    """Each command in its own bash, after the variables set so far. An assignment runs once,
    as in a user's shell (`KEY=$(curl -X POST ...)` creates one key), and its values are kept."""
    preamble: list[str] = []
    ran = []
    for raw in cmds:
        command = raw.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        script = "set -o pipefail\n" + "\n".join(preamble) + "\n"
        if _is_assignment(command):
            names = " ".join(_assigned_names(command))
            script += f"{command}\nrc=$?\necho {_VARS}\ndeclare -p {names} 2>/dev/null\nexit $rc\n"
        else:
            script += re.sub(r"^curl ", f"curl -sS -w '\\n{_STATUS}%{{http_code}}\\n' ", command)
        done = subprocess.run(
            ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        output, status = done.stdout, None
        if _is_assignment(command):
            output, _, declared = output.rpartition(f"{_VARS}\n")
            preamble.append(declared)  # `declare -p` prints shell that sets them again
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


def relative_links(page: str) -> list[str]:
    """Targets of the page's markdown links and images that are not URLs (code blocks left out)."""
    prose = re.sub(r"^```.*?^```", "", page, flags=re.S | re.M)
    targets = re.findall(r"\]\(([^)\s]+)\)", prose)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def anchors(page: str) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces to `-`."""
    prose = re.sub(r"^```.*?^```", "", page, flags=re.S | re.M)
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose, re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found
