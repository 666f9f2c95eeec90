"""The README's "Try it" and "prefixctl" sections, run as written against a server started with
the defaults (only the port differs), from a directory laid out like the repository's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.readme_runner import commands, failures, run_commands, shell_blocks
from tests.server_process import ROOT, ServerProcess, clean_env
from tests.tiny_models import save_adapter

README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("section", ["Try it", "prefixctl"])
def test_readme_section_runs_as_written(section: str, tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")  # the README calls .venv/bin/...
    blocks = shell_blocks(README, section)
    assert blocks, f"no shell blocks in '## {section}'"
    with ServerProcess.with_defaults(tmp_path) as server:
        demo = tmp_path / "data" / "models" / "demo"
        # what the README assumes the user has: a PEFT checkpoint made for the served model
        save_adapter(demo, tmp_path / "my-adapter", num_virtual_tokens=8, seed=1)
        save_adapter(demo, tmp_path / "my-peft-adapter", num_virtual_tokens=8, seed=2)
        if section == "prefixctl":  # it reuses the file the "Try it" section made
            run_commands(commands(shell_blocks(README, "Try it")[0])[:2], tmp_path, server.port, clean_env())
        ran = run_commands([c for b in blocks for c in commands(b)], tmp_path, server.port, clean_env())
    assert len(ran) >= 5
    assert failures(ran) == []
