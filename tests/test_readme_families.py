"""The table of tested model families (docs/models.md) names exactly the families the tests serve."""

from __future__ import annotations

from pathlib import Path

from tests.tiny_families import FAMILIES

MODELS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "models.md"
ORACLE_HTTP_ROWS = {"GPT-2", "Llama (the demo model's shape)"}  # tests/integration/test_oracle_http.py


def test_models_page_lists_the_tested_families() -> None:
    text = MODELS_PAGE.read_text()
    table = text[text.index("Tested model families") :].split("\n\n")[1]
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]  # after the header rows
    titles = {row.split("|")[1].strip() for row in rows}
    assert titles == {family.title for family in FAMILIES.values()} | ORACLE_HTTP_ROWS
