"""The workflow on a SLURM cluster (snakemake-executor-plugin-slurm, profiles/slurm*).

Every run is the README's command, ``snakemake --profile slurm`` (or ``slurm-gpu``), after
its one setup step, ``make profiles``, into a config home of the test's own
(``XDG_CONFIG_HOME``), plus the overrides the test cluster needs.

The ``slurm`` tests run against the single-node test cluster of ``.ci/slurm.sh`` (partition
``debug``, one fake GPU): install it first with ``bash .ci/slurm.sh install`` (root or
password-less sudo). The module starts the cluster and stops it again. Without SLURM these
tests fail rather than skip; deselect them with ``-m "not slurm"``. The dry run needs no
cluster and is among the fast tests.

Every job's comment is its rule (``rule_<name>_wildcards_<...>``) and its work directory is
the workflow copy, and the cluster keeps finished jobs listed for 10 minutes (MinJobAge), so
``squeue`` tells which rules ran as which jobs of which run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import arviz as az
import numpy as np
import pytest

from conftest import REPO, SMALL_SIMULATED, copy_workflow, preset, snakemake, write_config

SLURM_SH = REPO / ".ci" / "slurm.sh"
REMOTE_RULES = {"simulate", "load", "slice", "covariates", "fit", "summary", "plot_elbo", "ppc", "anndata"}
UPSTREAM_RULES = ("simulate", "load", "slice", "covariates")
UPSTREAM_OUTPUTS = (
    "simulated.h5ad",
    "qc.json",
    "selection.h5ad",
    "covariates_cells.tsv",
    "covariates_genes.tsv",
)
# The test cluster has no slurmdbd (so no sacct) and no real accounts; a command-line
# --default-resources replaces the profile's whole block, so it repeats every entry. The
# plugin polls 1 s after a submission, then every 11, 21, ... s until a job ends (the
# default first wait, 40 s, would dominate these short jobs).
CLUSTER_ARGS = (
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "1",
    "--default-resources", "slurm_account=test", "slurm_partition=debug", "mem_mb=1000", "runtime=10",
)
RUN_TIMEOUT = 600
# Attributes of trace.nc that record when and how fast, not what was fitted.
TIMING_ATTRS = {"created_at", "fit_seconds", "compile_seconds", "ms_per_step"}


def slurm_command(profile: str, configfile: str, *extra: str) -> list[str]:
    # No --config: it would replace the profile's `config:` entries (the backend).
    return ["snakemake", "--profile", profile, "--configfile", configfile, *extra, *CLUSTER_ARGS]


def slurm_environment(workdir: Path) -> dict:
    """The venv running the tests first on PATH (jobs inherit it from the submitting process),
    and the workflow copy's own config home, where `make profiles` links the profiles."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONWARNINGS": "ignore", "XDG_CONFIG_HOME": str(workdir / ".config")}


def cluster_workflow(destination: Path) -> Path:
    """A workflow copy set up as the README says: `make profiles` from its root."""
    workdir = copy_workflow(destination)
    shutil.copy2(REPO / "Makefile", workdir / "Makefile")
    result = subprocess.run(["make", "profiles"], cwd=workdir, capture_output=True, text=True, timeout=60,
                            env=slurm_environment(workdir))
    check_ok(result, "make profiles")
    return workdir


def run_slurm(workdir: Path, profile: str, configfile: str, *extra: str) -> subprocess.CompletedProcess:
    """The command to its end; on a timeout, fail with what the cluster was doing, and cancel
    the run's jobs so that they hold no CPUs for the next test."""
    try:
        return subprocess.run(slurm_command(profile, configfile, *extra), cwd=workdir, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT, env=slurm_environment(workdir))
    except subprocess.TimeoutExpired as timeout:
        stderr = timeout.stderr.decode(errors="replace") if isinstance(timeout.stderr, bytes) else timeout.stderr
        report = cluster_report(workdir)
        cancel_jobs_of(workdir)
        pytest.fail(f"snakemake --profile {profile} ran past {RUN_TIMEOUT} s:\n{tail(stderr or '')}\n{report}")


def cluster_report(workdir: Path) -> str:
    """The jobs of ``workdir`` with their states, the node's state and the tails of the job logs."""
    node = subprocess.run(["scontrol", "-o", "show", "node"], capture_output=True, text=True, timeout=60).stdout
    logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    parts = [f"jobs: {cluster_jobs(workdir)}", f"node: {node.strip()}"]
    parts += [f"--- {log.relative_to(workdir)}\n{tail(log.read_text(errors='replace'), 25)}" for log in logs]
    return "\n".join(parts)


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def check_ok(result: subprocess.CompletedProcess, what: str):
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{tail(result.stdout)}\n{tail(result.stderr)}"


def rule_of(comment: str) -> str:
    match = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", comment)
    return match.group(1) if match else comment


def cluster_jobs(workdir: Path) -> dict[int, dict]:
    """SLURM jobs (any state) submitted from ``workdir``: id -> rule, state."""
    listing = subprocess.run(
        ["squeue", "--states=all", "--noheader", "-o", "%i|%k|%T|%Z"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    jobs = {}
    for line in listing.splitlines():
        job_id, comment, state, directory = line.strip().split("|", 3)
        if Path(directory).resolve() == workdir.resolve():
            jobs[int(job_id)] = {"rule": rule_of(comment.strip()), "state": state}
    return jobs


def job_details(job_id: int) -> str:
    return subprocess.run(["scontrol", "-o", "show", "job", str(job_id)],
                          capture_output=True, text=True, timeout=60, check=True).stdout


def rules_submitted(jobs: dict[int, dict]) -> list[str]:
    return sorted(job["rule"] for job in jobs.values())


def cancel_jobs_of(workdir: Path):
    """Leave nothing of a failed test behind on the cluster."""
    live = [str(i) for i, job in cluster_jobs(workdir).items() if job["state"] in ("PENDING", "RUNNING")]
    if live:
        subprocess.run(["scancel", *live], timeout=60)


@pytest.fixture(scope="module")
def slurm_cluster():
    """The single-node test cluster, up for this module; always brought down afterwards."""
    missing = [tool for tool in ("sinfo", "squeue", "sbatch", "scancel", "scontrol") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"SLURM is not installed ({', '.join(missing)} not found): run `bash .ci/slurm.sh install`")
    try:
        up = subprocess.run(["bash", str(SLURM_SH), "up"], capture_output=True, text=True, timeout=300)
        if up.returncode != 0:
            pytest.fail(f"`.ci/slurm.sh up` failed ({up.returncode}):\n{tail(up.stdout)}\n{tail(up.stderr, 150)}")
        info = subprocess.run(["sinfo", "--noheader", "-o", "%P %a %t %G"], capture_output=True, text=True, timeout=60)
        if info.returncode != 0 or "debug" not in info.stdout:
            pytest.fail(f"no partition `debug` after `.ci/slurm.sh up`: {info.stdout} {info.stderr}")
        # A node with fewer CPUs than a fit's threads would leave that job pending for ever.
        cpus = subprocess.run(["sinfo", "--noheader", "-o", "%c"], capture_output=True, text=True, timeout=60)
        if int(cpus.stdout.split()[0]) != len(os.sched_getaffinity(0)):
            pytest.fail(f"the test node has {cpus.stdout.strip()} CPUs, this machine {len(os.sched_getaffinity(0))}")
        yield
    finally:
        subprocess.run(["bash", str(SLURM_SH), "down"], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("profile", ["slurm", "slurm-gpu"])
def test_profiles_are_found_by_name_after_make_profiles(tmp_path, profile):
    workdir = cluster_workflow(tmp_path / "scnbvi")
    linked = workdir / ".config" / "snakemake" / profile
    assert linked.is_symlink() and linked.resolve() == (workdir / "profiles" / profile).resolve()

    result = run_slurm(workdir, profile, write_config(workdir, SMALL_SIMULATED), "--dry-run")
    check_ok(result, f"snakemake --profile {profile} --dry-run")
    assert f"Using profiles {profile} and workflow specific profile profiles/default" in result.stderr


@pytest.mark.slow
def test_cpu_profile_reuses_a_result_fitted_locally_with_the_defaults(tmp_path):
    """A user who fitted on a laptop and then types `snakemake --profile slurm` gets nothing rerun."""
    workdir = cluster_workflow(tmp_path / "scnbvi")
    config = {key: value for key, value in SMALL_SIMULATED.items() if key != "backend"}  # the default
    configfile = write_config(workdir, config)
    check_ok(snakemake(workdir, "--configfile", configfile), "local snakemake")

    result = run_slurm(workdir, "slurm", configfile, "--dry-run")
    check_ok(result, "snakemake --profile slurm --dry-run")
    assert "Nothing to be done" in result.stdout + result.stderr, tail(result.stdout + result.stderr)


def assert_same_trace(left: Path, right: Path):
    a, b = az.from_netcdf(left).posterior, az.from_netcdf(right).posterior
    assert sorted(a.data_vars) == sorted(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-10, atol=1e-12, err_msg=name)
    strip = lambda attrs: {k: v for k, v in attrs.items() if k not in TIMING_ATTRS}  # noqa: E731
    assert strip(a.attrs) == strip(b.attrs)


@pytest.mark.slurm
def test_cpu_profile_runs_every_rule_as_a_job_with_local_results(slurm_cluster, tmp_path):
    on_slurm = cluster_workflow(tmp_path / "slurm")
    local = copy_workflow(tmp_path / "local")
    slurm_config = write_config(on_slurm, SMALL_SIMULATED)
    local_config = write_config(local, SMALL_SIMULATED)

    # The local run is mostly CPU and the SLURM run mostly waiting: side by side.
    with ThreadPoolExecutor(max_workers=1) as pool:
        local_run = pool.submit(snakemake, local, "--configfile", local_config, timeout=RUN_TIMEOUT)
        try:
            result = run_slurm(on_slurm, "slurm", slurm_config)
        finally:
            local_result = local_run.result()
    check_ok(result, "snakemake --profile slurm")
    check_ok(local_result, "local snakemake")

    jobs = cluster_jobs(on_slurm)
    assert rules_submitted(jobs) == sorted(REMOTE_RULES), jobs  # each rule once, `all` stays local
    assert {job["state"] for job in jobs.values()} == {"COMPLETED"}, jobs

    slurm_results, local_results = on_slurm / "results" / "sim", local / "results" / "sim"
    for name in ("genes.tsv", "summary.csv"):
        assert (slurm_results / name).read_bytes() == (local_results / name).read_bytes(), name
    assert_same_trace(slurm_results / "trace.nc", local_results / "trace.nc")
    stats = json.loads((slurm_results / "fit_stats.json").read_text())
    assert (stats["engine"], stats["backend"]) == ("pymc", "c")


@pytest.mark.slurm
def test_gpu_profile_requests_a_gpu_for_fit_only(slurm_cluster, tmp_path):
    workdir = cluster_workflow(tmp_path / "slurm-gpu")
    # No backend in the config file: the profile's `backend=jax` must win anyway.
    config = write_config(workdir, {k: v for k, v in SMALL_SIMULATED.items() if k != "backend"})

    result = run_slurm(workdir, "slurm-gpu", config, "--verbose")
    check_ok(result, "snakemake --profile slurm-gpu")

    # What snakemake asked for: the sbatch command lines it logs with --verbose.
    sbatch_lines = [line for line in (result.stdout + result.stderr).splitlines() if "sbatch call:" in line]
    requests = {}
    for line in sbatch_lines:
        rule = rule_of(re.search(r"--comment (\S+)", line).group(1))
        options = line.split("--wrap=")[0]
        requests[rule] = bool(re.search(r"--gpus[= ]|--gres[= ]\S*gpu|--gpus-per-", options))
    assert sorted(requests) == sorted(REMOTE_RULES), sbatch_lines
    assert requests == {rule: rule == "fit" for rule in REMOTE_RULES}, requests

    # What SLURM got: the jobs' GPU requests (TresPerJob/TresPerNode, e.g. gres:gpu:1).
    jobs = cluster_jobs(workdir)
    assert rules_submitted(jobs) == sorted(REMOTE_RULES), jobs
    assert {job["state"] for job in jobs.values()} == {"COMPLETED"}, jobs
    for job_id, job in jobs.items():
        tres = re.findall(r"\bTresPer(?:Job|Node|Task)=(\S+)", job_details(job_id))
        asked_gpu = any("gpu" in value for value in tres)
        assert asked_gpu == (job["rule"] == "fit"), (job["rule"], tres)

    trace = az.from_netcdf(workdir / "results" / "sim" / "trace.nc")
    assert trace.posterior.attrs["engine"] == "jax"
    assert trace.posterior.attrs["backend"] == "jax"
    assert json.loads((workdir / "results" / "sim" / "fit_stats.json").read_text())["engine"] == "jax"


# A fit that runs its full max_iterations (patience above the number of checks: no early
# stop), about 13 s of steps on the C backend; it logs a line every check_every steps.
SLOW_FIT = preset("small_simulated")
SLOW_FIT["datasets"]["sim"]["inference"].update(max_iterations=20000, check_every=1000, patience=1000)


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen, output: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"snakemake exited ({process.returncode}) before {what}:\n{tail(output.read_text())}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{tail(output.read_text())}\n"
                f"{cluster_report(output.parent)}")


@pytest.mark.slurm
def test_cancelled_fit_is_resumed_without_rerunning_upstream_jobs(slurm_cluster, tmp_path):
    workdir = cluster_workflow(tmp_path / "slurm-cancel")
    config = write_config(workdir, SLOW_FIT)
    command = slurm_command("slurm", config, "--retries", "0")
    results = workdir / "results" / "sim"
    output = workdir / "first-run.txt"

    with output.open("w") as sink:
        first = subprocess.Popen(command, cwd=workdir, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                 env=slurm_environment(workdir))
    try:
        def running_fit():
            running = [i for i, job in cluster_jobs(workdir).items()
                       if job["rule"] == "fit" and job["state"] == "RUNNING"]
            return running[0] if running else None

        fit_job = wait_for(running_fit, 300, "the fit job to run", first, output)
        # Mid-run: wait until the ADVI steps are under way (a progress line in the rule's log).
        fit_log = results / "logs" / "fit.log"
        wait_for(lambda: fit_log.exists() and " step " in fit_log.read_text(), 120,
                 "the fit to log progress", first, output)
        assert cluster_jobs(workdir)[fit_job]["state"] == "RUNNING", "fit finished before it could be cancelled"
        subprocess.run(["scancel", str(fit_job)], check=True, timeout=60)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.terminate()
            try:
                first.wait(timeout=60)
            except subprocess.TimeoutExpired:
                first.kill()
                first.wait()
        cancel_jobs_of(workdir)

    first_output = output.read_text()
    assert first.returncode != 0, f"snakemake succeeded despite the cancelled fit:\n{tail(first_output)}"
    jobs_before = cluster_jobs(workdir)
    assert rules_submitted(jobs_before) == sorted([*UPSTREAM_RULES, "fit"]), jobs_before
    assert jobs_before[fit_job]["state"] == "CANCELLED", jobs_before
    assert all(job["state"] == "COMPLETED" for i, job in jobs_before.items() if i != fit_job), jobs_before
    assert not (results / "trace.nc").exists()
    # scancel sends SIGTERM first: the fit saved its progress before it was stopped.
    assert (results / "fit.checkpoint").is_file(), tail((results / "logs" / "fit.log").read_text())
    mtimes = {name: (results / name).stat().st_mtime_ns for name in UPSTREAM_OUTPUTS}

    # The very same command again: only the cancelled job and what depends on it run.
    second = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            env=slurm_environment(workdir))
    check_ok(second, "rerun after the cancelled fit")

    jobs_after = cluster_jobs(workdir)
    new_jobs = {i: job for i, job in jobs_after.items() if i not in jobs_before}
    assert rules_submitted(new_jobs) == ["anndata", "fit", "plot_elbo", "ppc", "summary"], new_jobs
    assert {job["state"] for job in new_jobs.values()} == {"COMPLETED"}, new_jobs
    assert {name: (results / name).stat().st_mtime_ns for name in UPSTREAM_OUTPUTS} == mtimes
    for name in ("trace.nc", "elbo.tsv", "fit_stats.json", "summary.csv", "genes.tsv", "elbo.png"):
        assert (results / name).stat().st_size > 0, name
    stats = json.loads((results / "fit_stats.json").read_text())
    assert stats["steps"] >= SLOW_FIT["datasets"]["sim"]["inference"]["max_iterations"] - 1, stats
    # The rerun resumed from the checkpoint (not a fresh start), then removed it.
    assert "resuming from checkpoint" in (results / "logs" / "fit.log").read_text()
    assert not (results / "fit.checkpoint").exists()
