"""The README's commands and the CLI reference match the real entry points."""

from __future__ import annotations

import re
from pathlib import Path

from clapedge.cli_reference import render, scripts

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == render(), \
        "docs/cli.md is stale: run python -m clapedge.cli_reference > docs/cli.md"


def test_readme_commands_are_make_targets_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no '{target}' target"
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_names_real_commands_and_api():
    readme = (ROOT / "README.md").read_text()
    for command in re.findall(r"\b(clap-[a-z]+)\b", readme):
        assert command in scripts(), f"README mentions {command}, which is not installed"
    from clapedge.runtime import Runtime

    for method in re.findall(r"rt\.([a-z_]+)\(", readme):
        assert hasattr(Runtime, method), f"README uses Runtime.{method}, which does not exist"
    for link in re.findall(r"\]\((docs/[^)]+)\)", readme):
        assert (ROOT / link).is_file(), f"README links {link}, which does not exist"
