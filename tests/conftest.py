"""Shared test helpers: the preset configs of .test/config, the real data next to the repository,
small AnnData files, and running the workflow in a scratch copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PRESETS = REPO / ".test" / "config"
WORKFLOW_PARTS = ("Snakefile", "config", "workflow", "envs", "profiles", "resources", "src", ".test")


def preset(name: str) -> dict:
    """A config of .test/config, read afresh so that a test can change its copy freely."""
    return yaml.safe_load((PRESETS / f"{name}.yaml").read_text())


# Property-based tests: a few examples in the default run, more under CI=true (.ci/run). Each run
# draws its own examples; a failure prints the seed to replay it with: pytest --hypothesis-seed=N.
settings.register_profile("default", max_examples=10, deadline=None, derandomize=False, database=None,
                          print_blob=True)
settings.register_profile("ci", settings.get_profile("default"), max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "default")

# The tests' default configuration: a small simulated data set that fits in seconds.
SMALL_SIMULATED = preset("small_simulated")


def require_shared_data(*names: str) -> None:
    """Skip unless the named real data files are in ../shared/data, beside the repository; under
    CI=true a missing file fails instead, since a skip there would hide tests that never ran."""
    missing = [name for name in names if not (SHARED_DATA / name).is_file()]
    if not missing:
        return
    paths = ", ".join(f"../shared/data/{name}" for name in missing)
    message = f"{paths} missing: the real test data goes beside the repository, in {SHARED_DATA}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def pytest_runtest_setup(item):
    """Tests marked ``shared_data(name, ...)`` need those files; checked before their fixtures run."""
    for marker in item.iter_markers("shared_data"):
        require_shared_data(*marker.args)


def make_adata(counts, obs=None, var=None) -> ad.AnnData:
    """Counts (dense or sparse, kept as given) with cells c0, c1, ... and genes g0, g1, ...;
    ``obs`` and ``var`` are extra columns (a mapping or a DataFrame, one value per row)."""
    n_cells, n_genes = counts.shape
    return ad.AnnData(X=counts, obs=_frame(obs, "c", n_cells), var=_frame(var, "g", n_genes))


def _frame(columns, prefix: str, n: int) -> pd.DataFrame:
    # np.asarray: a Series or DataFrame column keeps its values, not its own index.
    values = {} if columns is None else {name: np.asarray(column) for name, column in columns.items()}
    return pd.DataFrame(values, index=[f"{prefix}{i}" for i in range(n)])


def write_h5ad(path: Path, counts, obs=None, var=None) -> str:
    """``make_adata`` written to ``path``; returns the path as a string, ready for a config."""
    make_adata(counts, obs, var).write_h5ad(path)
    return str(path)


def write_zarr(adata: ad.AnnData, path: Path, zarr_format: int = 3) -> str:
    """``adata`` written as an AnnData zarr store (a directory) at ``path``; returns the path as a string."""
    with ad.settings.override(zarr_write_format=zarr_format), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's and zarr's notices of coming defaults
        adata.write_zarr(path)
    return str(path)


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


# Snakemake's SLURM executor plugin runs `scontrol show config` when it is imported, by every
# Snakemake process; with SLURM installed but its controller stopped (CI, between the SLURM tests)
# that waits 9 s each time. Local runs never use SLURM: they find a scontrol that fails at once.
LOCAL_BIN = Path(__file__).parent / "local_bin"


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run snakemake from the venv running the tests, locally; never hangs past ``timeout``."""
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    environment = {**os.environ, "PYTHONWARNINGS": "ignore",
                   "PATH": os.pathsep.join([str(LOCAL_BIN), os.environ.get("PATH", "")])}
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=environment)


def write_config(workdir: Path, config: dict, name: str = "test.yaml") -> str:
    path = workdir / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def workflow_copy(tmp_path) -> Path:
    return copy_workflow(tmp_path / "scnbvi")
