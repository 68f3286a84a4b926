"""The conda environments of the rules pin the same versions as requirements.txt."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


@pytest.mark.parametrize("env_file", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_pins_agree_with_requirements(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert "conda-forge" in env["channels"]
    pins = _requirements()
    for dependency in env["dependencies"]:
        name, _, version = dependency.partition("=")
        assert version and "*" not in version, f"{env_file.name}: {dependency} is not pinned"
        if name == "python":
            assert version == "3.11"
            continue
        assert pins.get(name) == version, f"{env_file.name}: {name}={version}, requirements.txt has {pins.get(name)}"


def test_every_rule_names_an_existing_env():
    rules = "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    named = {line.strip().strip('"').split("/")[-1] for line in rules.splitlines() if "envs/" in line}
    assert named and named <= {p.name for p in (REPO / "envs").glob("*.yaml")}


def test_lock_file_contains_every_requirement_at_the_same_version():
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==")
            lock[name.lower().replace("_", "-")] = version
    for name, version in _requirements().items():
        assert lock.get(name.replace("_", "-")) == version, name
