"""The README runner itself: it must see a failed command, or the README test proves nothing."""

from pathlib import Path

from tests.readme_runner import Ran, commands, failures, run_commands, shell_blocks

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
