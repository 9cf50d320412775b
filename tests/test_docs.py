"""The README is the front page: short, the two set-up commands CI runs, the headline results under their
heading, no history of its making; every relative link in it and in docs/ resolves."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()
SETUP = (
    "python3 -m venv .venv && .venv/bin/python -m pip install -q -r requirements.txt -e .",
    '.venv/bin/python -m pytest -m "not slow"',
)
PAGES = [REPO / "README.md", REPO / "config" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_readme_is_a_front_page():
    assert len(README) <= 14_000, f"README.md is {len(README)} characters: move details to docs/"
    assert "\n## Headline results\n" in README and "\n## Quick start\n" in README
    assert not re.search(r"\bsessions?\b|\bsittings?\b|was lent", README, re.I)


def test_ci_runs_the_readme_commands():
    ci = (REPO / ".ci" / "run").read_text()
    for command in SETUP:
        assert command in README and command in ci


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    missing = [link for link in re.findall(r"\]\(([^)#\s]+)", page.read_text())
               if not link.startswith(("http://", "https://")) and not (page.parent / link).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_docs_carry_the_protocol_they_cite():
    reference = (REPO / "docs" / "protocol.md").read_text()
    assert "# The paper's experimental protocol" in reference and "## In ewcstab" in reference
