"""Shared fixtures: running the workflow in a scratch copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
WORKFLOW_PARTS = ("Snakefile", "config", "workflow", "envs", "profiles", "resources", "src")


def copy_workflow(destination: Path) -> Path:
    """A copy of the workflow (not its results), so a test run cannot touch the checkout."""
    destination.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, destination / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.exists():
            shutil.copy2(source, destination / part)
    return destination


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run snakemake from the venv running the tests; never hangs past ``timeout``."""
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=environment)


def write_config(workdir: Path, config: dict, name: str = "test.yaml") -> str:
    path = workdir / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def workflow_copy(tmp_path) -> Path:
    return copy_workflow(tmp_path / "scnbvi")


# A small simulated data set that fits in seconds; the tests' default configuration.
SMALL_SIMULATED = {
    "backend": "c",
    "datasets": {
        "sim": {
            "simulate": {"n_cells": 300, "n_genes": 40, "seed": 3},
            "covariates": {
                "depth": {"source": "obs", "column": "depth", "per_cell": True},
                "gene_length": {"source": "var", "column": "length"},
            },
            "inference": {"max_iterations": 3000, "check_every": 250, "draws": 200},
        }
    },
}
