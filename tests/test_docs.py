"""The user documentation states what the code does: docs/method.md's constants table equals C2F's defaults."""

import dataclasses
import re
from pathlib import Path

from c2f_med.explain.base import available
from c2f_med.explain.c2f import C2F

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _table_rows(text: str, header: str) -> dict[str, str]:
    """``| `name` | value | ... |`` rows of the table under the heading ``header``."""
    section = text.split(header, 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `([^`]+)` \| ([^|]+) \|", section, re.M)}


def test_method_constants_match_the_code():
    rows = _table_rows((DOCS / "method.md").read_text(), "## Constants and their defaults")
    defaults = {f.name: f.default for f in dataclasses.fields(C2F.Params)}
    assert set(rows) == set(defaults), set(rows) ^ set(defaults)
    for name, value in defaults.items():
        assert rows[name] == str(value), f"{name}: docs say {rows[name]}, code has {value}"


def test_method_variants_are_registered():
    rows = _table_rows((DOCS / "method.md").read_text(), "## Variants and ablations")
    assert rows and set(rows) <= set(available())
    assert {"c2f", "c2f-first", "c2f-noS3WM", "c2f-noAF", "vitcx"} <= set(rows)
