"""Benchmarks sharing docs/benchmarks.md never overwrite each other's sections."""

from pathlib import Path

from bench.doc_sections import write_section


def test_sections_are_created_replaced_and_kept_apart(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    write_section(doc, "throughput", "# Benchmarks\n\nfirst")
    write_section(doc, "soak", "## Soak\n\nrun 1")
    write_section(doc, "throughput", "# Benchmarks\n\nsecond")
    write_section(doc, "soak", "## Soak\n\nrun 2")
    assert doc.read_text() == (
        "<!-- throughput:begin -->\n# Benchmarks\n\nsecond\n<!-- throughput:end -->\n\n"
        "<!-- soak:begin -->\n## Soak\n\nrun 2\n<!-- soak:end -->\n"
    )
