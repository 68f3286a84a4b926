"""Write config/README.md from workflow/schemas/config.schema.yaml, so the two cannot disagree.

    python .ci/config_readme.py > config/README.md

tests/test_docs.py fails when the file is not what this script writes from the current schema.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"

INTRO = """\
# Configuration

<!-- Generated from workflow/schemas/config.schema.yaml by .ci/config_readme.py; do not edit. -->

`config/config.yaml` holds the top-level settings. Name your data sets in a config file of your
own and pass it with `--configfile`; it replaces the built-in simulated data set:

```yaml
# my.yaml
datasets:
  mine:
    path: data/my_counts.h5ad          # cells x genes raw counts
    slice:
      genes: {method: hvg, n: 3000}
```

```bash
snakemake --cores 2 --configfile my.yaml      # or: snakemake --profile slurm --configfile my.yaml
```

Each data set's sections override the defaults below key by key. The schema,
`workflow/schemas/config.schema.yaml`, validates the config before any job runs: a misspelled
key or a wrong type stops the workflow with one line naming it. The README explains the
settings at more length.
"""


def flow(value) -> str:
    """A value as it would be written in the config file (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def default_cell(spec: dict) -> str:
    if "default" not in spec:
        return "(none)"
    default = spec["default"]
    if isinstance(default, dict) and default:
        return "see below"
    return f"`{flow(default)}`"


def allowed_cell(spec: dict) -> str:
    if "enum" in spec:
        return ", ".join(f"`{flow(value)}`" for value in spec["enum"])
    types = spec.get("type", "")
    types = [types] if isinstance(types, str) else types
    bounds = [f"{sign} {spec[key]}" for key, sign in
              (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
              if key in spec]
    return ", ".join([" or ".join(types), *bounds])


def meaning_cell(spec: dict) -> str:
    text = re.sub(r"\s+", " ", spec.get("description", "")).strip()
    return text.replace("|", "\\|").replace("<", "&lt;")


def rows(properties: dict, prefix: str = ""):
    """(key path, spec) of every setting, depth first; objects with properties are only their keys."""
    for name, spec in properties.items():
        if "properties" in spec:
            yield from rows(spec["properties"], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", spec


def table(properties: dict, prefix: str = "") -> list[str]:
    lines = ["| Key | Default | Allowed | Meaning |", "| --- | --- | --- | --- |"]
    blocks = []
    for key, spec in rows(properties, prefix):
        lines.append(f"| `{key}` | {default_cell(spec)} | {allowed_cell(spec)} | {meaning_cell(spec)} |")
        if default_cell(spec) == "see below":
            blocks += ["", f"Default of `{key}`:", "", "```yaml",
                       yaml.safe_dump({key: spec["default"]}, sort_keys=False, default_flow_style=None).strip(), "```"]
    return lines + blocks


def render(schema: dict) -> str:
    dataset = schema["$defs"]["dataset"]["properties"]
    lines = [INTRO, "## Top level", "", *table(schema["properties"]), "",
             "## Each data set", "",
             "Keys under `datasets.<name>`, written here relative to the data set (`slice.genes.n` is "
             "`datasets.<name>.slice.genes.n`).", ""]
    for name, spec in dataset.items():
        lines += [f"### `{name}`", ""]
        if spec.get("description") and "properties" in spec:
            lines += [meaning_cell(spec), ""]
        lines += [*table({name: spec}), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(yaml.safe_load(SCHEMA.read_text())))
