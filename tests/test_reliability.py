"""Failures of the machine and of the workflow's bookkeeping: a full disk, repeated cell or gene
names in the load rule, package edits that must rerun the jobs using the package, one bad data
set among good ones, and a failed rerun that must not lose the last finished results."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import arviz as az
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

import conftest
import scnbvi
from conftest import REPO, SMALL_SIMULATED, preset, snakemake, write_config, write_h5ad
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
    target = tmp_path / "simulated.h5ad"
    with open(target, "wb") as previous:
        previous.truncate(int(3.2e9))

    with pytest.raises(DiskFullError, match=r"; free about 3\.2 GB \("):
        with atomic_output(target) as temporary:
            fail_after_writing(0, OSError(errno.ENOSPC, "No space left on device"))(temporary)

    assert [path.name for path in tmp_path.iterdir()] == ["simulated.h5ad"]


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
    write_counts(counts, f"{directory}/simulated.h5ad")
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
        for kind, name in (("h5ad", "simulated.h5ad"), ("trace", "trace.nc"))
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


def test_the_workflow_imports_only_the_standard_library_snakemake_yaml_and_jsonschema():
    """Snakemake's own process parses the rules at every start: it need not load numpy or pandas."""
    sources = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    imports = r"^\s*(?:from\s+([\w.]+)\s+import\b|import\s+([\w.]+))"
    modules = {"".join(match) for source in sources for match in re.findall(imports, source.read_text(), re.M)}
    package = sorted(module for module in modules if module.split(".")[0] == "scnbvi")
    others = {module.split(".")[0] for module in modules} - {"scnbvi", "snakemake", "yaml", "jsonschema"}
    assert others <= sys.stdlib_module_names, others - sys.stdlib_module_names
    assert package, "common.smk imports the package's version, source hash and contrast naming"

    check = (f"import sys; before = set(sys.modules); import {', '.join(package)}; "
             "loaded = {module.split('.')[0] for module in set(sys.modules) - before}; "
             "print(sorted(loaded - sys.stdlib_module_names - {'scnbvi'}))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO / "src")})
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_missing_shared_data_file_is_skipped_outside_ci_and_fails_under_ci(tmp_path, monkeypatch, ci):
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
    monkeypatch.setenv("CI", ci)
    (tmp_path / "present.h5ad").touch()
    conftest.require_shared_data("present.h5ad")

    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as raised:
        conftest.require_shared_data("present.h5ad", "absent.h5ad")
    assert str(raised.value) == (
        f"../shared/data/absent.h5ad missing: the real test data goes beside the repository, in {tmp_path}")


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

    result = snakemake(workflow_copy, "results/dup/selection.h5ad", "--configfile", config)

    assert result.returncode == 0, result.stderr
    out = workflow_copy / "results" / "dup"
    assert list(ad.read_h5ad(out / "selection.h5ad").var_names) == ["ACTB", "GAPDH", "ACTB-1", "MALAT1"]
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
    lines = list(dict.fromkeys(line for line in result.stderr.splitlines() if line.startswith("scnbvi error")))
    assert lines == [
        f"scnbvi error in rule load: {path}: var_names: 1 repeated names (first: 'ACTB', 2 times); fix: make them "
        "unique in the file (adata.var_names_make_unique()) or set load.duplicate_names: make_unique"
    ], result.stderr
    assert not (workflow_copy / "results" / "dup" / "qc.json").exists()


PACKAGE_RULES = ("simulate", "load", "slice", "covariates", "fit", "summary", "plot_elbo", "ppc")


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


FINISHED_RESULTS = ("trace.nc", "summary.csv", "genes.tsv", "elbo.tsv", "fit_stats.json", "elbo.png", "design.json")
DE_RESULTS = tuple(f"de/condition_treated_vs_control{suffix}" for suffix in (".tsv", "_ma.png", "_volcano.png"))


def _write_simulated_file(path: Path) -> tuple[str, ad.AnnData]:
    from scnbvi.simulate import SimulationTruth, simulate_counts

    truth = simulate_counts(300, 40, seed=5, truth=SimulationTruth(condition_effect_sd=0.7))
    truth.write_h5ad(path)
    return str(path), truth


def _assert_recovers(out: Path, truth: ad.AnnData, design: tuple[tuple[str, str], ...] = ()):
    """A converged fit whose gene effects follow the simulated ones: with a design, each gene's level at
    the cells' average covariates (only differences between genes are identified, so correlations)."""
    assert json.loads((out / "fit_stats.json").read_text())["converged"] == 1
    assert az.from_netcdf(out / "trace.nc").posterior.attrs["converged"] == 1
    genes = pd.read_csv(out / "genes.tsv", sep="\t", index_col=0)
    assert list(genes.index) == list(truth.var_names)
    level = truth.var["true_gene_effect"].copy()
    for column, value in design:
        level += truth.var[f"true_beta_{column}[{value}]"] * np.mean(truth.obs[column] == value)
    assert np.corrcoef(genes["log_expression_mean"], level)[0, 1] > 0.95


@pytest.mark.slow
def test_keep_going_finishes_the_good_data_sets_when_one_is_bad(workflow_copy):
    config = preset("small_simulated")
    sim = config["datasets"]["sim"]
    file_path, file_truth = _write_simulated_file(workflow_copy / "file.h5ad")
    counts = sp.lil_matrix(np.random.default_rng(0).poisson(2.0, (30, 8)).astype(np.float32))
    counts[1, 2] = -3
    bad_path = write_h5ad(workflow_copy / "bad.h5ad", counts.tocsr())
    config["datasets"]["file"] = {
        "path": file_path, "covariates": sim["covariates"], "inference": sim["inference"],
        "design": {"categorical": ["condition"]}, "contrasts": [["condition", "treated", "control"]],
    }
    config["datasets"]["bad"] = {"path": bad_path}

    result = snakemake(workflow_copy, "--keep-going", "--configfile", write_config(workflow_copy, config))

    assert result.returncode != 0
    errors = list(dict.fromkeys(line for line in result.stderr.splitlines() if line.startswith("scnbvi")))
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(
        f"scnbvi error in rule load: {bad_path}: X: 1 negative values (first: cell 'c1', gene 'g2' = -3); fix: ")
    results = workflow_copy / "results"
    _assert_recovers(results / "sim", ad.read_h5ad(results / "sim" / "simulated.h5ad"))
    _assert_recovers(results / "file", file_truth, design=(("condition", "treated"),))
    de = pd.read_csv(results / "file" / "de" / "condition_treated_vs_control.tsv", sep="\t", index_col=0)
    true_log2fc = file_truth.var.loc[de.index, "true_beta_condition[treated]"] / np.log(2)
    assert np.corrcoef(de["log2_fold_change"], true_log2fc)[0, 1] > 0.95
    for name, kept in (("sim", FINISHED_RESULTS), ("file", FINISHED_RESULTS + DE_RESULTS)):
        for result_file in kept:
            assert (results / name / "previous" / result_file).stat().st_size > 0, (name, result_file)
    bad_files = [path.relative_to(results / "bad") for path in (results / "bad").rglob("*") if path.is_file()]
    assert bad_files == [Path("logs/load.log")]


def _inode_and_bytes(path: Path) -> tuple[int, bytes]:
    return path.stat().st_ino, path.read_bytes()


@pytest.mark.slow
def test_a_failed_rerun_leaves_the_last_finished_results_in_previous(workflow_copy):
    out = workflow_copy / "results" / "sim"
    first = preset("small_simulated")
    assert snakemake(workflow_copy, "--configfile", write_config(workflow_copy, first)).returncode == 0
    unchanged = snakemake(workflow_copy, "--configfile", write_config(workflow_copy, first), "-n")
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr, unchanged.stdout
    first_trace = _inode_and_bytes(out / "trace.nc")
    # Hard links: the copy costs no space while it is the same as the results.
    for name in FINISHED_RESULTS:
        assert _inode_and_bytes(out / "previous" / name) == _inode_and_bytes(out / name), name
    first_config = yaml.safe_load((out / "previous" / "config.yaml").read_text())
    assert first_config["datasets"]["sim"]["de"]["lfc_threshold"] == 0.5
    # as readable as results/ itself (group members included), not private like a fresh mkdtemp
    assert (out / "previous").stat().st_mode & 0o777 == out.stat().st_mode & 0o777

    # A setting that changes no result still takes a new copy, so that its config stays the results' own.
    second = preset("small_simulated")
    second["datasets"]["sim"]["de"] = {"lfc_threshold": 1.0}
    rerun = snakemake(workflow_copy, "--configfile", write_config(workflow_copy, second))
    assert rerun.returncode == 0, rerun.stderr
    assert "rule previous:" in rerun.stdout + rerun.stderr and "rule fit:" not in rerun.stdout + rerun.stderr
    kept_config = yaml.safe_load((out / "previous" / "config.yaml").read_text())
    assert kept_config["backend"] == "c" and list(kept_config["datasets"]) == ["sim"]
    assert kept_config["datasets"]["sim"]["de"]["lfc_threshold"] == 1.0
    assert _inode_and_bytes(out / "trace.nc") == first_trace
    assert sorted(path.name for path in out.iterdir() if path.name.startswith((".", "previous"))) == [
        "previous", "previous.json"]  # no half-made or old copy left beside it

    # A learning rate this large diverges at once: the fit fails after Snakemake deleted its outputs.
    diverging = preset("small_simulated")
    diverging["datasets"]["sim"]["inference"].update(learning_rate=1e6, init="prior")
    failed = snakemake(workflow_copy, "--configfile", write_config(workflow_copy, diverging))
    assert failed.returncode != 0
    errors = list(dict.fromkeys(line for line in failed.stderr.splitlines() if line.startswith("scnbvi")))
    assert len(errors) == 1 and errors[0].startswith("scnbvi error in rule fit: "), failed.stderr[-3000:]
    assert "learning_rate" in errors[0]
    assert not (out / "trace.nc").exists()

    assert (out / "previous" / "trace.nc").read_bytes() == first_trace[1]
    assert (out / "previous" / "trace.nc").stat().st_nlink == 1  # its own file now that trace.nc is gone
    assert yaml.safe_load((out / "previous" / "config.yaml").read_text()) == kept_config
    assert az.from_netcdf(out / "previous" / "trace.nc").posterior.attrs["learning_rate"] == 0.05
    manifest = json.loads((out / "previous.json").read_text())
    assert set(FINISHED_RESULTS) <= set(manifest["files"]) and set(manifest["files"].values()) == {"linked"}
