"""The front door and the manual: README.md is short and links every docs/ page; docs/recipes.md is exactly
what the schema generates, and every schema key has a meaning there."""
from __future__ import annotations

import re
from pathlib import Path

from bcdcore.recipe.reference import missing_meanings, reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_readme_is_a_front_door_of_at_most_150_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


def test_readme_links_every_docs_page_and_nothing_outside_the_repository():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", readme)
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in links, f"README.md does not link docs/{page.name}"
    for link in links:
        assert not link.startswith(("http", "..", "/")), f"README.md links outside the repository: {link}"
        assert (REPO / link.split("#")[0].replace("%5B", "[").replace("%5D", "]")).exists(), f"broken link {link}"


def test_recipes_reference_is_generated_from_the_schema():
    assert missing_meanings() == []
    page = (REPO / "docs" / "recipes.md").read_text()
    assert page == reference_markdown(), ("docs/recipes.md is out of date: "
                                          "python -m bcdcore.recipe.reference > docs/recipes.md")


def test_the_reference_reads_defaults_from_the_dataclasses():
    from bcdcore.recipe import RunConfig

    assert f"| rounds | int >= 1 | {RunConfig().rounds} |" in reference_markdown()
