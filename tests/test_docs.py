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


# -------------------------------------------------------------------- config keys named in the docs

CONFIG_KEY_DOCUMENTS = [REPO / "README.md", CONFIG_README, *sorted((REPO / "docs").glob("*.md"))]
# A backticked dotted name is a config key when it starts with a section of the schema; a name
# ending in one of these is a file (`design.json`, `ppc.json`), not a key.
FILE_SUFFIXES = {"json", "tsv", "csv", "png", "nc", "h5ad", "yaml", "md", "py", "smk", "log", "html", "R", "checkpoint"}


def schema_sections(schema: dict) -> dict[str, dict]:
    """Where a key may start: the top-level properties and those of one data set."""
    return {**schema["properties"], **schema["$defs"]["dataset"]["properties"]}


def unknown_config_keys(text: str, schema: dict) -> list[str]:
    """The backticked dotted config keys of `text` that the schema does not have."""
    sections = schema_sections(schema)
    unknown = []
    for key in re.findall(r"`([A-Za-z_]+(?:\.[A-Za-z_<>]+)+)`", text):
        parts = key.split(".")
        if parts[-1] in FILE_SUFFIXES:
            continue
        if parts[0] == "datasets":  # datasets.<name>.section.key
            parts = parts[2:]
        if not parts or parts[0] not in sections:
            continue
        spec = {"properties": sections}
        for part in parts:
            spec = spec.get("properties", {}).get(part)
            if spec is None:
                unknown.append(key)
                break
    return unknown


def test_the_key_checker_tells_a_wrong_key_from_a_right_one():
    text = "Set `design.random`, `inference.learning_rate`, `check.nuts.tune`, `backend`, `design.json`."
    assert unknown_config_keys(text, SCHEMA) == []
    wrong = "Set `inference.learn_rate`, `de.center` and `datasets.mine.slice.genes.count`."
    assert unknown_config_keys(wrong, SCHEMA) == ["inference.learn_rate", "de.center", "datasets.mine.slice.genes.count"]


def test_every_config_key_named_in_the_docs_is_in_the_schema():
    unknown = {str(document.relative_to(REPO)): keys for document in CONFIG_KEY_DOCUMENTS
               if (keys := unknown_config_keys(document.read_text(), SCHEMA))}
    assert not unknown, f"keys not in workflow/schemas/config.schema.yaml: {unknown}"


# ------------------------------------------------------------ the architecture's file lists

ARCHITECTURE = REPO / "docs" / "architecture.md"
LISTED_FOLDERS = ["workflow/rules", "workflow/scripts", "src/scnbvi", "src/scnbvi/likelihood", "src/scnbvi/inference"]


def listed_files(markdown: str) -> set[str]:
    """The files of the ```text blocks: a line holding only `folder/` starts a list, and each
    line indented by two spaces under it names one file of that folder."""
    listed = set()
    for block in re.findall(r"^```text\n(.*?)^```", markdown, flags=re.M | re.S):
        folder = None
        for line in block.splitlines():
            if header := re.fullmatch(r"(\S+)/\s*", line):
                folder = header.group(1)
            elif folder and (entry := re.match(r"  (\S+\.(?:py|smk))(?:\s|$)", line)):
                listed.add(f"{folder}/{entry.group(1)}")
    return listed


def test_the_file_list_reader_reads_folders_and_their_entries():
    markdown = "```text\nsrc/pkg/\n  a.py      what a does\n            more of it\n  sub/      below\n```\n"
    assert listed_files(markdown) == {"src/pkg/a.py"}


def test_the_architecture_lists_every_module_rule_file_and_script():
    listed = listed_files(ARCHITECTURE.read_text())
    present = {str(path.relative_to(REPO)) for folder in LISTED_FOLDERS for path in (REPO / folder).iterdir()
               if path.suffix in (".py", ".smk")}
    assert not present - listed, f"docs/architecture.md does not list {sorted(present - listed)}"
    assert not listed - present, f"docs/architecture.md lists files that do not exist: {sorted(listed - present)}"


WHERE_TO_CHANGE = ("likelihood", "design term", "output table", "new rule", "new engine")


def test_the_architecture_says_where_to_change_each_part_and_names_files_that_exist():
    text = ARCHITECTURE.read_text()
    section = text.split("## Where to change X", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]
    subjects = [row.split("|")[1].lower() for row in rows]
    assert all(any(topic in subject for subject in subjects) for topic in WHERE_TO_CHANGE), subjects
    named = {path.rstrip("/") for path in re.findall(r"`((?:src|workflow|tests|envs|profiles)/[^`]+)`", section)}
    assert len(named) > 10
    missing = [path for path in named if not any(REPO.glob(path))]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
