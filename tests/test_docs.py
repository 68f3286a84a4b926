"""The documentation stays true to the code: config/README.md to the schema it is written from,
and every link between the Markdown files to a file and heading that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_README = REPO / "config" / "README.md"
MARKDOWN = [REPO / "README.md", REPO / "CHANGELOG.md", CONFIG_README, *sorted((REPO / "docs").glob("*.md"))]

_spec = importlib.util.spec_from_file_location("config_readme", REPO / ".ci" / "config_readme.py")
config_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config_readme)
SCHEMA = yaml.safe_load(config_readme.SCHEMA.read_text())
REGENERATE = "regenerate it: python .ci/config_readme.py > config/README.md"


def test_config_readme_lists_every_setting_with_its_default():
    text = CONFIG_README.read_text()
    every = [*config_readme.rows(SCHEMA["properties"]), *config_readme.rows(SCHEMA["$defs"]["dataset"]["properties"])]
    assert len(every) > 50
    missing = [key for key, spec in every if f"| `{key}` | {config_readme.default_cell(spec)} |" not in text]
    assert not missing, f"config/README.md lacks {missing}; {REGENERATE}"


def test_config_readme_is_what_the_schema_generates():
    assert CONFIG_README.read_text() == config_readme.render(SCHEMA), f"config/README.md is stale; {REGENERATE}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(match) for match in re.findall(r"^#+ (.+)$", prose, flags=re.M)}


def test_links_between_documents_resolve():
    broken = []
    for document in MARKDOWN:
        prose = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{document.relative_to(REPO)}: {target}")
    assert not broken, broken
