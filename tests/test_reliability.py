"""Failures of the machine and of the workflow's bookkeeping: a full disk, repeated cell or gene
names in the load rule, and package edits that must rerun the jobs using the package."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scnbvi
from conftest import REPO, SMALL_SIMULATED, snakemake, write_config
from scnbvi import outputs
from scnbvi.errors import DiskFullError, ScnbviError
from scnbvi.outputs import atomic_output, code_version, git_commit, source_hash

H5PY_DISK_FULL = (
    "Can't close file (file write failed: time = Thu Nov 26 03:46:31 2026\n, filename = '/data/x.h5ad', "
    "file descriptor = 3, errno = 28, error message = 'No space left on device', buf = 0x55805fa67b40, "
    "total write size = 2048, bytes this sub-write = 2048, offset = 4096)"
)


def fail_after_writing(size: int, error: BaseException):
    """A writer that leaves ``size`` bytes (sparse, so no disk is used) and then raises ``error``."""

    def write(path: Path):
        with open(path, "wb") as file:
            file.truncate(size)
        raise error

    return write


def chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.ENOSPC, H5PY_DISK_FULL),  # h5py: errno 28 and HDF5's text
    RuntimeError("Can't decrement id ref count (" + H5PY_DISK_FULL.split("(", 1)[1]),  # h5py: text only
    chained(KeyError("h5netcdf.core.File"), OSError(errno.ENOSPC, H5PY_DISK_FULL)),  # xarray's file cache
], ids=["oserror", "h5py-oserror", "h5py-runtimeerror", "wrapped"])
def test_full_disk_is_one_line_saying_how_much_to_free_and_leaves_no_file(tmp_path, monkeypatch, error):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, free=0))
    target = tmp_path / "results" / "x" / "trace.nc"

    with pytest.raises(DiskFullError) as raised:
        with atomic_output(target) as temporary:
            fail_after_writing(int(2.43e9), error)(temporary)

    assert str(raised.value) == (
        f"no space left on device writing {target}; free about 2.4 GB (0.0 GB free there now) and rerun"
    )
    assert isinstance(raised.value, ScnbviError) and isinstance(raised.value, OSError)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.__cause__ is error
    assert list(target.parent.iterdir()) == []


def test_full_disk_estimate_is_the_previous_result_when_the_write_failed_early(tmp_path):
    target = tmp_path / "validated.h5ad"
    with open(target, "wb") as previous:
        previous.truncate(int(3.2e9))

    with pytest.raises(DiskFullError, match=r"; free about 3\.2 GB \("):
        with atomic_output(target) as temporary:
            fail_after_writing(0, OSError(errno.ENOSPC, "No space left on device"))(temporary)

    assert [path.name for path in tmp_path.iterdir()] == ["validated.h5ad"]


def test_other_write_errors_pass_unchanged_and_leave_no_file(tmp_path):
    error = OSError(errno.EACCES, "Permission denied")
    with pytest.raises(OSError) as raised:
        with atomic_output(tmp_path / "qc.json") as temporary:
            fail_after_writing(10, error)(temporary)

    assert raised.value is error
    assert list(tmp_path.iterdir()) == []


FULL_DISK_WRITER = """
import os, sys
import numpy as np, scipy.sparse as sp, anndata as ad, xarray as xr
from scnbvi.data import write_counts
from scnbvi.errors import DiskFullError
from scnbvi.outputs import atomic_output

directory = sys.argv[1]
counts = ad.AnnData(X=sp.random(2000, 300, density=0.3, format="csr", random_state=0))
try:
    write_counts(counts, f"{directory}/validated.h5ad")
except DiskFullError as error:
    print("h5ad:", error, "| left:", os.listdir(directory), flush=True)
draws = xr.Dataset({"x": (("chain", "draw", "gene"), np.zeros((1, 1000, 300)))})
try:
    with atomic_output(f"{directory}/trace.nc") as path:
        draws.to_netcdf(path, engine="h5netcdf")
except DiskFullError as error:
    print("trace:", error, "| left:", os.listdir(directory), flush=True)
"""


def test_writing_results_onto_a_really_full_disk(tmp_path):
    """A 256 kB tmpfs in a user namespace (no root needed); skipped where the kernel forbids it."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("unprivileged user namespaces (unshare -rm) are not available here")
    script = tmp_path / "writer.py"
    script.write_text(FULL_DISK_WRITER)
    command = f"mount -t tmpfs -o size=256k none {mount} && {sys.executable} {script} {mount}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})

    # HDF5 may still crash the process afterwards, on a file it could not close; the line is out by then.
    lines = [line for line in result.stdout.splitlines() if line.startswith(("h5ad:", "trace:"))]
    assert lines == [
        f"{kind}: no space left on device writing {mount}/{name}; free about 0.1 GB (0.0 GB free there now) "
        "and rerun | left: []"
        for kind, name in (("h5ad", "validated.h5ad"), ("trace", "trace.nc"))
    ], result.stdout + result.stderr[-3000:]


def test_code_version_names_version_source_hash_and_commit():
    version = code_version()

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert version["scnbvi_version"] == scnbvi.__version__ == pyproject["project"]["version"]
    assert version["scnbvi_source_hash"] == source_hash() and len(source_hash()) == 12
    assert set(version) == {"scnbvi_version", "scnbvi_source_hash", "git_commit"}


def test_source_hash_follows_every_file_but_not_bytecode(tmp_path):
    package = tmp_path / "scnbvi"
    shutil.copytree(REPO / "src" / "scnbvi", package, ignore=shutil.ignore_patterns("__pycache__"))
    original = source_hash(package)

    (package / "inference" / "__pycache__").mkdir()
    (package / "inference" / "__pycache__" / "advi.cpython-311.pyc").write_bytes(b"bytecode")
    assert source_hash(package) == original

    with open(package / "inference" / "advi.py", "a") as file:
        file.write("# a comment\n")
    assert source_hash(package) != original


def _git(directory, *args):
    subprocess.run(["git", "-C", str(directory), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_the_checkout_head_dirty_or_unknown(tmp_path):
    package = tmp_path / "repo" / "src" / "scnbvi"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "0"\n')
    assert git_commit(package) == "unknown"

    _git(tmp_path / "repo", "init", "-q")
    assert git_commit(package) == "unknown"  # a repository that does not track the package
    _git(tmp_path / "repo", "add", ".")
    _git(tmp_path / "repo", "commit", "-q", "-m", "package")
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit(package) == head.strip()

    (package / "__init__.py").write_text('__version__ = "1"\n')
    assert git_commit(package) == head.strip() + "-dirty"


def test_outputs_imports_only_the_standard_library():
    """common.smk imports it in Snakemake's own process, which need not have numpy or pandas."""
    check = "import sys, scnbvi.outputs; print(sorted({'numpy', 'pandas', 'anndata'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO / "src")})
    assert result.stdout.strip() == "[]", result.stderr


def _duplicate_named_file(path: Path) -> str:
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (20, 4)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* names are not unique", category=UserWarning)
        adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(20)]),
                           var=pd.DataFrame(index=["ACTB", "GAPDH", "ACTB", "MALAT1"]))
    adata.write_h5ad(path)
    return str(path)


@pytest.mark.slow
def test_load_rule_makes_repeated_gene_names_unique_and_records_them(workflow_copy):
    path = _duplicate_named_file(workflow_copy / "dup.h5ad")
    config = write_config(workflow_copy, {"datasets": {"dup": {"path": path}}})

    result = snakemake(workflow_copy, "results/dup/qc.json", "--configfile", config)

    assert result.returncode == 0, result.stderr
    out = workflow_copy / "results" / "dup"
    assert list(ad.read_h5ad(out / "validated.h5ad").var_names) == ["ACTB", "GAPDH", "ACTB-1", "MALAT1"]
    qc = json.loads((out / "qc.json").read_text())
    assert qc["renamed"] == {"obs": {"count": 0, "names": {}}, "var": {"count": 1, "names": {"ACTB": ["ACTB-1"]}}}
    assert qc["actions"]["duplicate_names"] == "make_unique"
    assert qc["code_version"]["scnbvi_source_hash"] == source_hash(workflow_copy / "src" / "scnbvi")
    assert qc["code_version"]["git_commit"] == "unknown"  # the copy is not a git checkout


@pytest.mark.slow
def test_load_rule_with_duplicate_names_error_stops_with_one_line(workflow_copy):
    path = _duplicate_named_file(workflow_copy / "dup.h5ad")
    config = write_config(workflow_copy, {"datasets": {"dup": {"path": path, "load": {"duplicate_names": "error"}}}})

    result = snakemake(workflow_copy, "results/dup/qc.json", "--configfile", config)

    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("scnbvi error")]
    assert lines == [
        f"scnbvi error in rule load: {path}: var_names: 1 repeated names (first: 'ACTB', 2 times); fix: make them "
        "unique in the file (adata.var_names_make_unique()) or set load.duplicate_names: make_unique"
    ], result.stderr
    assert not (workflow_copy / "results" / "dup" / "validated.h5ad").exists()
    assert not (workflow_copy / "results" / "dup" / "qc.json").exists()


PACKAGE_RULES = ("simulate", "load", "slice", "covariates", "fit", "summary", "plot_elbo")


def _status_by_rule(result) -> dict[str, set[str]]:
    """From ``snakemake --summary``: the statuses of each rule's outputs (e.g. "ok", "params changed")."""
    assert result.returncode == 0, result.stdout + result.stderr
    status = {}
    for line in result.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) == 6 and fields[0] != "output_file":
            status.setdefault(fields[2], set()).add(fields[4])
    return status


@pytest.mark.slow
def test_editing_the_package_reruns_every_job_that_runs_it(workflow_copy):
    config = write_config(workflow_copy, SMALL_SIMULATED)
    run = snakemake(workflow_copy, "--configfile", config)
    assert run.returncode == 0, run.stderr
    unchanged = snakemake(workflow_copy, "--configfile", config, "-n")
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr, unchanged.stdout

    engine = workflow_copy / "src" / "scnbvi" / "inference" / "advi.py"
    original = engine.read_text()
    engine.write_text(original + "# an edit that changes no behaviour\n")

    planned = snakemake(workflow_copy, "--configfile", config, "-n")
    assert planned.returncode == 0, planned.stderr
    for rule in PACKAGE_RULES:
        assert f"rule {rule}:" in planned.stdout, planned.stdout
    # A dry run shows only the first reason of a job; the summary has each output's own. Every rule
    # runs the package, so a rule added without `code=CODE_VERSION` shows up here as "ok".
    status = _status_by_rule(snakemake(workflow_copy, "--configfile", config, "--summary"))
    assert set(PACKAGE_RULES) <= set(status)
    assert {rule: {"params changed"} for rule in status} == status

    engine.write_text(original)
    reverted = snakemake(workflow_copy, "--configfile", config, "-n")
    assert "Nothing to be done" in reverted.stdout + reverted.stderr, reverted.stdout
