"""The README runner itself: it must see a failed command, or the README test proves nothing.
Also: every page with runnable blocks is run somewhere, every relative link resolves, and every
folder says what it holds."""

import ast
import subprocess
from pathlib import Path

from tests.readme_runner import (
    RUN_ELSEWHERE,
    SESSIONS,
    Ran,
    anchors,
    commands,
    doc_pages,
    failures,
    page_blocks,
    relative_links,
    run_commands,
    shell_blocks,
)
from tests.server_process import ROOT

DOC = """# x
## Try it

```bash
TOKEN=abc   # kept for later commands
curl -X PUT -H "Authorization: Bearer $TOKEN" \\
     http://127.0.0.1:8000/a
```

```bash no-run
make serve ARGS="--model Qwen/Qwen2.5-0.5B"
```
## Next
"""


def test_blocks_and_commands_are_split_as_a_shell_reads_them() -> None:
    blocks = shell_blocks(DOC, "Try it")
    assert len(blocks) == 1  # the no-run block is left out
    assert page_blocks(DOC) == blocks
    assert commands(blocks[0]) == [
        "TOKEN=abc   # kept for later commands",
        'curl -X PUT -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8000/a',
    ]


def test_failures_are_seen(tmp_path: Path) -> None:
    ran = run_commands(
        ["X=1", "test $X = 1 && echo ok", "false", "echo $X"], tmp_path, 1, {"PATH": "/usr/bin:/bin"}
    )
    assert [r.returncode for r in ran] == [0, 0, 1, 0] and ran[3].output.strip() == "1"
    assert failures(ran) == [f"exit 1: false\n{ran[2].output}"]
    assert failures([Ran("curl x", 0, "{}", 404)]) == ["HTTP 404: curl x\n{}"]
    assert failures([Ran("curl x", 0, "", 200)]) == ["empty answer: curl x"]
    assert failures([Ran("curl -X DELETE x", 0, "", 204)]) == []


def test_an_assignment_runs_once_as_in_a_users_shell(tmp_path: Path) -> None:
    ran = run_commands(
        ["N=$(echo x >> count; wc -l < count)", "echo $N", "export A=1 B=$((N + 1))", "bash -c 'echo $A $B'"],
        tmp_path,
        1,
        {"PATH": "/usr/bin:/bin"},
    )
    assert failures(ran) == [] and ran[1].output.strip() == "1" and ran[3].output.strip() == "1 2"
    assert (tmp_path / "count").read_text() == "x\n"  # not re-run before each later command


def test_every_page_with_runnable_blocks_is_run() -> None:
    in_sessions = [page for pages in SESSIONS.values() for page in pages]
    assert len(in_sessions) == len(set(in_sessions)) and not set(in_sessions) & set(RUN_ELSEWHERE)
    for page in in_sessions + list(RUN_ELSEWHERE):
        assert page_blocks((ROOT / page).read_text()), f"{page} lists no runnable blocks"
    for page, test in RUN_ELSEWHERE.items():
        assert page in (ROOT / test).read_text(), f"{test} does not run {page}"
    runnable = {str(p.relative_to(ROOT)) for p in doc_pages() if page_blocks(p.read_text())}
    assert runnable == set(in_sessions) | set(RUN_ELSEWHERE)


def test_anchors_are_githubs() -> None:
    page = "# x\n## Scale-out: routing (`bench/a_b.py`)\n```\n# not a heading\n```\n### Sampling penalties\n"
    assert anchors(page) == {"x", "scale-out-routing-bencha_bpy", "sampling-penalties"}


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in doc_pages():
        for target in relative_links(page.read_text()):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_every_folder_says_what_it_holds() -> None:
    """Each top-level folder's first file (its `__init__.py`, else its README.md) says what it holds."""
    skipped = {"data"}  # not in the repository: run data (.gitignore)
    for folder in sorted(ROOT.iterdir()):
        if not folder.is_dir() or folder.name.startswith((".", "_")) or folder.name in skipped:
            continue
        if folder.name.endswith(".egg-info"):
            continue
        init, readme = folder / "__init__.py", folder / "README.md"
        if init.exists():
            assert ast.get_docstring(ast.parse(init.read_text())), f"{folder.name}/__init__.py: no docstring"
        else:
            assert readme.exists() and readme.read_text().strip(), f"{folder.name}/ has no README.md"
    tracked = subprocess.run(["git", "ls-files", "*__init__.py"], cwd=ROOT, capture_output=True, text=True)
    for init in tracked.stdout.split():  # every package below the top level too
        assert ast.get_docstring(ast.parse((ROOT / init).read_text())), f"{init}: no docstring"
