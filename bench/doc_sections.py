"""Several benchmarks share `docs/benchmarks.md`: each owns one marked section and rewrites only it."""

from pathlib import Path


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the section `name` of `path` with `text` (appended if missing; the file created if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block
    path.write_text(new)
