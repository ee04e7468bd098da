"""docs/config_reference.md is what the config classes say today."""

import pathlib

import pytest

from tml.core.config.reference import render_reference
from tml.projects.config_reference import COMMAND, roots

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_config_reference_is_current():
    path = ROOT / "docs" / "config_reference.md"
    expected = render_reference(roots(), COMMAND)
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    if current != expected:
        old, new = current.splitlines(), expected.splitlines()
        line = next(
            (i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new))
        )
        got, want = (lines[line] if line < len(lines) else "<end of file>" for lines in (old, new))
        pytest.fail(
            f"docs/config_reference.md is stale: line {line + 1} reads {got!r}, the config classes give {want!r}.\n"
            f"Regenerate it from the repository root with:\n    {COMMAND}",
            pytrace=False,
        )
