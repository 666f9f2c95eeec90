"""The shell blocks of the README and of the docs pages, run as written against a server started
with the defaults (only the port differs), from a directory laid out like the repository's.

Each session of `SESSIONS` gets one server; its pages run in order in one directory (files a
page writes stay for the next), each page with its own shell variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.readme_runner import SESSIONS, commands, failures, page_blocks, run_commands
from tests.server_process import ROOT, ServerProcess, clean_env
from tests.tiny_models import save_adapter


@pytest.mark.parametrize("session", sorted(SESSIONS))
def test_doc_pages_run_as_written(session: str, tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")  # the pages call .venv/bin/...
    with ServerProcess.with_defaults(tmp_path) as server:
        demo = tmp_path / "data" / "models" / "demo"
        # what the pages assume the user has: a PEFT checkpoint made for the served model
        save_adapter(demo, tmp_path / "my-adapter", num_virtual_tokens=8, seed=1)
        save_adapter(demo, tmp_path / "my-peft-adapter", num_virtual_tokens=8, seed=2)
        for page in SESSIONS[session]:
            blocks = page_blocks((ROOT / page).read_text())
            assert blocks, f"{page} has no shell blocks to run"
            ran = run_commands([c for b in blocks for c in commands(b)], tmp_path, server.port, clean_env())
            assert len(ran) >= 5, page
            assert failures(ran) == [], page
