"""The conda environments of the rules pin the same versions as requirements.txt and hold every
package their scripts import."""

import ast
import re
import sys
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


# Import names whose conda-forge package is named differently; the rest are the same.
CONDA_PACKAGE = {
    "yaml": "pyyaml", "skmisc": "scikit-misc", "sklearn": "scikit-learn", "PIL": "pillow", "adjustText": "adjusttext",
}
SCRIPTS = REPO / "workflow" / "scripts"
# Local top-level modules -> the folder they are imported from.
LOCAL_MODULES = {"scnbvi": REPO / "src", "_runner": SCRIPTS, "_counts": SCRIPTS}


def _rules() -> dict[str, tuple[Path, Path]]:
    """Rule name -> (script, conda env file) for every rule that runs a script."""
    rules = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^(?=rule \w+:)", smk.read_text(), flags=re.M):
            name = re.match(r"rule (\w+):", block)
            script = re.search(r'^\s+script:\s*\n\s+"([^"]+)"', block, flags=re.M)
            if not (name and script):
                continue
            conda = re.search(r'^\s+conda:\s*\n\s+"([^"]+)"', block, flags=re.M)
            assert conda, f"rule {name.group(1)} runs a script but names no conda env"
            rules[name.group(1)] = ((smk.parent / script.group(1)).resolve(), (smk.parent / conda.group(1)).resolve())
    return rules


def _module_files(name: str, attribute: bool = False) -> list[Path]:
    """Source files that importing local module ``name`` runs: each package's __init__.py, then the module.

    With ``attribute``, the last part of ``name`` may be a name defined in its parent, not a submodule.
    """
    files, path = [], LOCAL_MODULES[name.split(".")[0]]
    parts = name.split(".")
    for position, part in enumerate(parts):
        path = path / part
        if (path / "__init__.py").is_file():
            files.append(path / "__init__.py")
        elif path.with_suffix(".py").is_file():
            files.append(path.with_suffix(".py"))
        elif attribute and position == len(parts) - 1:
            if lazy := _lazy_names(path.parent / "__init__.py").get(part):
                files.append(path.parent / f"{lazy}.py")
        else:
            raise AssertionError(f"import of {name}: no {path}.py or {path}/__init__.py")
    return files


def _lazy_names(init: Path) -> dict[str, str]:
    """A package's names loaded on first use (its ``LAZY`` dict: name -> submodule), which an
    import of the name runs as if it named the submodule."""
    if not init.is_file():
        return {}
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and [target.id for target in node.targets if isinstance(target, ast.Name)] == ["LAZY"]:
            return ast.literal_eval(node.value)
    return {}


def _package_of(path: Path) -> str:
    """Dotted name of the package a file under src/ belongs to (for relative imports)."""
    return ".".join(path.parent.relative_to(REPO / "src").parts)


def _imported_names(path: Path) -> set[tuple[str, bool]]:
    """(absolute module name, whether it may be an attribute) for every import in a file, function bodies included.

    ``from package import name`` also yields ``package.name``, which may be a submodule.
    """
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update((alias.name, False) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = _package_of(path).split(".")
                module = ".".join(package[: len(package) - node.level + 1] + ([module] if module else []))
            names.add((module, False))
            names.update((f"{module}.{alias.name}", True) for alias in node.names)
    return names


def _third_party_modules(script: Path) -> set[str]:
    """Top-level third-party modules a script imports, directly or through the package and _runner."""
    found, seen, pending = set(), set(), [script]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for name, attribute in _imported_names(path):
            top = name.split(".")[0]
            if top in LOCAL_MODULES:
                pending.extend(_module_files(name, attribute))
            elif top not in sys.stdlib_module_names:
                found.add(top)
    return found


def test_import_resolver_follows_the_package_and_the_runner():
    fit_modules = _third_party_modules(SCRIPTS / "fit.py")
    assert {"pymc", "pytensor", "jax", "optax", "psutil", "arviz", "anndata"} <= fit_modules
    assert not fit_modules & (set(LOCAL_MODULES) | set(sys.stdlib_module_names))


@pytest.mark.parametrize("rule", sorted(_rules()))
def test_rule_env_provides_every_module_its_script_imports(rule):
    script, env_file = _rules()[rule]
    env = yaml.safe_load(env_file.read_text())
    packages = {dependency.partition("=")[0] for dependency in env["dependencies"]}
    missing = {CONDA_PACKAGE.get(module, module) for module in _third_party_modules(script)} - packages
    assert not missing, f"rule {rule}: {script.name} imports {sorted(missing)}, absent from envs/{env_file.name}"
