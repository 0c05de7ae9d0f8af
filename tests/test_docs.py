"""The user documentation states what the code does: docs/method.md's constants table equals C2F's defaults,
and the CLI accepts every command the README and docs show."""

import dataclasses
import re
import shlex
from pathlib import Path

from c2f_med.cli import build_parser
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


def _documented_commands(text: str) -> list[list[str]]:
    """Every ``c2f-med ...`` command in the fenced code blocks of ``text`` (continuation lines joined,
    comments dropped), split into arguments."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ", 1)[0].strip()
            if line.startswith("c2f-med "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_documented_commands_parse():
    """The CLI accepts every command the README and docs show (verbs, flags, choices, method names)."""
    parser = build_parser()
    pages = [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]
    checked = 0
    for page in pages:
        for argv in _documented_commands(page.read_text()):
            try:
                a = parser.parse_args(argv)
            except SystemExit as err:
                raise AssertionError(f"{page.name}: c2f-med {' '.join(argv)}") from err
            for method in str(getattr(a, "methods", None) or getattr(a, "method", "") or "").split(","):
                assert not method or method in available(), f"{page.name}: unknown method {method!r}"
            checked += 1
    assert checked >= 5
