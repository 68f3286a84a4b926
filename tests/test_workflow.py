"""The workflow as a user runs it: dry-run, full runs, reruns after config changes, bad input."""

from __future__ import annotations

import json
import os
import time

import anndata as ad
import arviz as az
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import (PRESETS, SHARED_DATA, SMALL_SIMULATED, make_adata, preset, snakemake, write_config, write_h5ad,
                      write_zarr)
from scnbvi.data import read_counts, read_selected_counts
from scnbvi.qc import apply_qc_actions, gene_counts, slice_counts

pytestmark = pytest.mark.slow

OUTPUTS = ("trace.nc", "summary.csv", "genes.tsv", "cells.tsv", "scnbvi.h5ad", "elbo.tsv", "elbo.png", "design.json",
           "de/condition_treated_vs_control.tsv", "de/condition_treated_vs_control_ma.png",
           "de/condition_treated_vs_control_volcano.png", "ppc_genes.tsv", "ppc_cells.tsv", "ppc.json",
           "ppc_zero_fraction.png", "ppc_mean_variance.png", "ppc_library_size.png")


def test_dry_run_of_default_config_plans_every_rule(workflow_copy):
    result = snakemake(workflow_copy, "-n")
    assert result.returncode == 0, result.stderr
    for rule in ("simulate", "load", "slice", "covariates", "fit", "summary", "plot_elbo", "ppc"):
        assert f"rule {rule}:" in result.stdout + result.stderr


@pytest.mark.shared_data("seed_demo_1000x500.h5ad")
@pytest.mark.parametrize("name", sorted(path.stem for path in PRESETS.glob("*.yaml")))
def test_dry_run_of_each_preset_from_the_repository_root(workflow_copy, name):
    """As the presets are used: from the repository root, with the real data in ../shared/data."""
    (workflow_copy.parent / "shared").symlink_to(SHARED_DATA.parent)
    result = snakemake(workflow_copy, "-n", "--configfile", f".test/config/{name}.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rule fit:" in result.stdout + result.stderr


def test_lint_passes(workflow_copy):
    result = snakemake(workflow_copy, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_workflow_runs_and_recovers_simulated_truth(workflow_copy):
    result = snakemake(workflow_copy)
    assert result.returncode == 0, result.stderr
    out = workflow_copy / "results" / "simulated"
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0
    truth = ad.read_h5ad(out / "simulated.h5ad")
    idata = az.from_netcdf(out / "trace.nc")
    attrs = idata.posterior.attrs
    assert attrs["backend"] == "jax" and attrs["engine"] == "jax" and attrs["converged"] == 1
    # Every draw of the global variables, the first 100 (inference.local_draws) of all of them.
    assert idata.posterior_global.sizes["draw"] == 1000 and idata.posterior.sizes["draw"] == 100
    genes = pd.read_csv(out / "genes.tsv", sep="\t", index_col=0)
    assert list(genes.index) == list(truth.var_names)
    # Gene effects carry the level shared with the cells (whose prior mean is 0): compare centred.
    # With the default design they are each gene's level at the cells' average covariates.
    coefficients = [c for c in truth.var.columns if c.startswith("true_beta_")]
    shares = [np.mean(truth.obs[c[10:].split("[")[0]] == c[10:].split("[")[1].rstrip("]")) for c in coefficients]
    level = truth.var["true_gene_effect"] + truth.var[coefficients].to_numpy() @ np.array(shares)
    estimate = genes["log_expression_mean"] - genes["log_expression_mean"].mean()
    assert np.corrcoef(estimate, level - level.mean())[0, 1] > 0.99
    for coefficient in coefficients:
        true_beta = truth.var[coefficient].to_numpy()
        assert np.corrcoef(genes[f"beta_{coefficient[10:]}_mean"], true_beta)[0, 1] > 0.95, coefficient
    de = pd.read_csv(out / "de" / "condition_treated_vs_control.tsv", sep="\t", index_col=0)
    true_log2fc = truth.var.loc[de.index, "true_beta_condition[treated]"] / np.log(2)
    assert np.corrcoef(de["log2_fold_change"], true_log2fc)[0, 1] > 0.99
    assert 0.9 <= np.mean((de["ci95_low"] < true_log2fc) & (true_log2fc < de["ci95_high"])) <= 0.99
    assert de["lfsr"].is_monotonic_increasing
    alpha = idata.posterior["alpha"].values.ravel()
    assert np.quantile(alpha, 0.001) < truth.uns["truth"]["alpha"] < np.quantile(alpha, 0.999)
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    assert {"mu_gene", "sigma_cond", "tau[condition[treated]]"} <= set(summary.index)
    assert summary.index.str.startswith("alpha").any()
    assert not summary.index.str.startswith("cell_effect[").any()
    # Fewer cells than cell_draws_max_cells: the trace keeps every cell's first 100 draws, and
    # cells.tsv holds the mean and sd over all 1000.
    cells = pd.read_csv(out / "cells.tsv", sep="\t", index_col=0)
    assert list(cells.index) == list(truth.obs_names)
    kept_mean = idata.posterior["cell_effect"].astype("float64").mean(("chain", "draw")).values
    mean, sd = cells["cell_effect_mean"].to_numpy(), cells["cell_effect_sd"].to_numpy()
    assert (np.abs(kept_mean - mean) < 5 * sd / np.sqrt(100)).all()
    assert np.corrcoef(cells["cell_effect_mean"], truth.obs["true_cell_effect"])[0, 1] > 0.6
    res = ad.read_h5ad(out / "scnbvi.h5ad")
    assert res.X is None and list(res.obs_names) == list(truth.obs_names) and list(res.var_names) == list(truth.var_names)
    np.testing.assert_allclose(res.obs["scnbvi_cell_effect_mean"], cells["cell_effect_mean"])
    np.testing.assert_allclose(res.var["scnbvi_log_expression_mean"], genes["log_expression_mean"])
    assert res.uns["scnbvi"]["convergence"]["converged"] == 1
    assert res.uns["scnbvi"]["inference"]["cell_draws_max_cells"] == 10000
    assert_no_copy_of_the_counts(workflow_copy / "results", inputs={out / "simulated.h5ad"})
    elbo = pd.read_csv(out / "elbo.tsv", sep="\t")
    assert list(elbo.columns[:2]) == ["iteration", "loss"] and len(elbo) == attrs["iterations"]
    # Data from the model itself: the fit's replicates bracket the observed counts.
    ppc = json.loads((out / "ppc.json").read_text())
    assert (ppc["genes"], ppc["cells"], ppc["draws"]) == (300, 1000, 50)
    assert max(ppc["genes_outside_band"].values()) <= 0.2 and ppc["cells_outside_band"]["library_size"] <= 0.2, ppc


def assert_no_copy_of_the_counts(results, inputs):
    """No .h5ad under results/ but the inputs holds a matrix: the rules read the counts from the input."""
    h5ads = set(results.rglob("*.h5ad")) - set(inputs)
    assert {path.name for path in h5ads} >= {"selection.h5ad", "scnbvi.h5ad"}
    for path in h5ads:
        with h5py.File(path, "r") as file:
            assert "X" not in file and len(file.get("layers", {})) == 0 and "raw" not in file, path


def _mtimes(directory, names):
    return {name: os.stat(directory / name).st_mtime_ns for name in names}


def test_changing_an_inference_setting_reruns_only_fit_and_downstream(workflow_copy):
    config = write_config(workflow_copy, SMALL_SIMULATED)
    assert snakemake(workflow_copy, "--configfile", config).returncode == 0
    out = workflow_copy / "results" / "sim"
    upstream = ("simulated.h5ad", "qc.json", "selection.h5ad", "covariates_cells.tsv")
    downstream = ("trace.nc", "summary.csv", "cells.tsv", "scnbvi.h5ad", "elbo.png")
    before = _mtimes(out, upstream + downstream)

    unchanged = snakemake(workflow_copy, "--configfile", config, "-n")
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr

    # Settings that only say how the fit runs (checkpoints, memory ceiling) rerun nothing.
    operational = preset("small_simulated")
    operational["datasets"]["sim"]["inference"].update(checkpoint_minutes=1.5, memory_limit_gb=7.0)
    planned = snakemake(workflow_copy, "--configfile", write_config(workflow_copy, operational, "run.yaml"), "-n")
    assert "Nothing to be done" in planned.stdout + planned.stderr, planned.stdout

    # A slice setting reruns slice and what reads the counts through its selection, not load.
    sliced = preset("small_simulated")
    sliced["datasets"]["sim"]["slice"] = {"genes": {"method": "first", "n": 30}}
    planned = snakemake(workflow_copy, "--configfile", write_config(workflow_copy, sliced, "sliced.yaml"), "-n")
    assert planned.returncode == 0, planned.stderr
    assert all(f"rule {rule}:" in planned.stdout for rule in ("slice", "covariates", "fit", "summary"))
    assert "rule simulate:" not in planned.stdout and "rule load:" not in planned.stdout

    # A load setting that says how the counts are read reruns every rule that reads them.
    renaming = preset("small_simulated")
    renaming["datasets"]["sim"]["load"] = {"duplicate_names": "error"}
    planned = snakemake(workflow_copy, "--configfile", write_config(workflow_copy, renaming, "load.yaml"), "-n")
    assert planned.returncode == 0, planned.stderr
    assert all(f"rule {rule}:" in planned.stdout for rule in ("load", "slice", "covariates", "fit", "summary", "ppc"))

    changed = preset("small_simulated")
    changed["datasets"]["sim"]["inference"]["learning_rate"] = 0.02
    config = write_config(workflow_copy, changed)
    result = snakemake(workflow_copy, "--configfile", config)
    assert result.returncode == 0, result.stderr
    after = _mtimes(out, upstream + downstream)
    assert all(after[name] == before[name] for name in upstream)
    assert all(after[name] > before[name] for name in downstream)
    assert az.from_netcdf(out / "trace.nc").posterior.attrs["learning_rate"] == 0.02


def test_the_counts_read_through_the_selection_are_those_a_sliced_copy_held(workflow_copy):
    """Same config, same numbers: what the slice rule selected, read from the input, is what the slice of
    the loaded counts in memory gives (what sliced.h5ad, the copy the rules read before, held)."""
    config = preset("small_simulated")
    slicing = {"cells": {"method": "random", "n": 200}, "genes": {"method": "hvg", "n": 25},
               "drop_zero_cells": True, "drop_zero_genes": True, "seed": 4}
    config["datasets"]["sim"]["slice"] = slicing
    result = snakemake(workflow_copy, "results/sim/selection.h5ad", "--configfile", write_config(workflow_copy, config))
    assert result.returncode == 0, result.stderr
    out = workflow_copy / "results" / "sim"

    loaded = apply_qc_actions(read_counts(out / "simulated.h5ad"))  # the load rule's default settings
    loaded.obs["total_counts"] = np.asarray(loaded.X.sum(axis=1)).ravel()
    sliced = slice_counts(loaded, cells_method="random", n_cells=200, genes_method="hvg", n_genes=25,
                          drop_zero_cells=True, drop_zero_genes=True, seed=4)
    read = read_selected_counts(out / "simulated.h5ad", out / "selection.h5ad")

    assert read.shape == (200, 25) and read.X.dtype == sliced.X.dtype
    assert list(read.obs_names) == list(sliced.obs_names) and list(read.var_names) == list(sliced.var_names)
    assert (read.X != sliced.X).nnz == 0
    pd.testing.assert_frame_equal(read.obs, sliced.obs)
    # The slice adds the genes' totals over the fitted cells, which genes.tsv reports.
    pd.testing.assert_frame_equal(read.var, sliced.var.join(gene_counts(sliced.X, sliced.var_names)))


@pytest.mark.shared_data("seed_demo_1000x500.h5ad")
def test_seed_demo_with_the_original_settings(workflow_copy):
    """The original notebook's slice and settings (iterations capped for time)."""
    config = preset("original_notebook")
    demo = config["datasets"]["demo"]
    demo["path"] = str(SHARED_DATA / "seed_demo_1000x500.h5ad")  # the scratch copy is not next to ../shared
    demo["inference"]["max_iterations"] = 3000
    result = snakemake(workflow_copy, "--configfile", write_config(workflow_copy, config))
    assert result.returncode == 0, result.stderr
    out = workflow_copy / "results" / "demo"
    idata = az.from_netcdf(out / "trace.nc")
    assert idata.posterior.attrs["minibatch"] == "entries"
    assert idata.posterior.sizes == {"chain": 1, "draw": 100, "gene": 500, "cell": 1000}
    assert 1 <= idata.posterior.attrs["iterations"] <= 3000
    qc = json.loads((out / "qc.json").read_text())
    assert qc["before"]["all_zero_genes"] == 250
    assert qc["after"] == qc["before"]  # load.zero_cells: keep, zero_genes: keep (the default): nothing dropped


def _good_counts():
    return sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (30, 8)).astype(np.float32))


BAD_INPUTS = {
    "negative": (lambda X: X.__setitem__((1, 2), -3), "load", "negative"),
    "non_integer": (lambda X: X.__setitem__((4, 1), 0.5), "load", "non-integer"),
    "nan": (lambda X: X.__setitem__((2, 0), np.nan), "load", "NaN"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_counts_fail_load_with_one_line_and_no_output(workflow_copy, kind):
    corrupt, rule, words = BAD_INPUTS[kind]
    counts = _good_counts().tolil()
    corrupt(counts)
    path = write_h5ad(workflow_copy / "bad.h5ad", counts.tocsr())
    config = write_config(workflow_copy, {"datasets": {"bad": {"path": path}}})
    result = snakemake(workflow_copy, "--configfile", config)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("scnbvi error")]
    # One error, printed by the job and repeated among the run's closing lines.
    assert len(lines) == 2 and lines[0] == lines[1]
    assert f"rule {rule}" in lines[0] and words in lines[0] and "bad.h5ad" in lines[0]
    assert not (workflow_copy / "results" / "bad" / "qc.json").exists()


def _run_expecting_error(workflow_copy, dataset: dict, expected: tuple[str, ...], absent: str):
    config = write_config(workflow_copy, {"datasets": {"bad": dataset}})
    result = snakemake(workflow_copy, "--configfile", config)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert all(word in text for word in expected), text[-2000:]
    assert not (workflow_copy / "results" / "bad" / absent).exists()
    return text


def test_missing_input_file_is_reported(workflow_copy):
    _run_expecting_error(workflow_copy, {"path": "no/such/file.h5ad"}, ("no/such/file.h5ad",), "qc.json")


def test_missing_obs_column_names_the_column(workflow_copy):
    path = write_h5ad(workflow_copy / "ok.h5ad", _good_counts())
    dataset = {"path": path, "covariates": {"depth": {"source": "obs", "column": "Bases"}}}
    text = _run_expecting_error(workflow_copy, dataset, ("obs['Bases']", "scnbvi error in rule covariates"), "covariates_cells.tsv")
    assert "fix:" in text
    # Repeated below Snakemake's own report of the failure, among the run's closing lines.
    lines = text.strip().splitlines()
    repeated = max(i for i, line in enumerate(lines) if line.startswith("scnbvi error in rule covariates"))
    assert repeated > max(i for i, line in enumerate(lines) if line.startswith("Error in rule covariates"))
    assert len(lines) - repeated <= 6, text[-1500:]


BAD_DESIGNS = {
    "misspelled column": ({"design": {"categorical": ["conditon"]}}, "obs has no column 'conditon'"),
    "unknown level": ({"design": {"categorical": ["condition"]}, "contrasts": [["condition", "treatd", "control"]]},
                      "'treatd' is not a level of 'condition'"),
    "missing values": ({"design": {"continuous": ["score"]}}, "obs['score'] has 1 missing values"),
}


@pytest.mark.parametrize("kind", sorted(BAD_DESIGNS))
def test_a_bad_design_stops_the_run_before_any_job_with_one_line(workflow_copy, kind):
    dataset, words = BAD_DESIGNS[kind]
    counts = _good_counts()
    score = np.linspace(0, 1, counts.shape[0])
    score[0] = np.nan
    obs = {"condition": ["control", "treated"] * (counts.shape[0] // 2), "score": score}
    path = write_h5ad(workflow_copy / "cells.h5ad", counts, obs=obs)
    config = write_config(workflow_copy, {"datasets": {"bad": {"path": path, **dataset}}})

    started = time.perf_counter()
    result = snakemake(workflow_copy, "--configfile", config)

    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"scnbvi error in data set bad ({path}), before any job: config: "), result.stderr[-2000:]
    assert words in last and "; fix: " in last
    assert not (workflow_copy / "results").exists()
    # Most of it is Snakemake's own start; the check itself takes about a second.
    assert time.perf_counter() - started < 60


def test_empty_slice_names_the_setting(workflow_copy):
    counts = _good_counts()
    path = write_h5ad(workflow_copy / "ok.h5ad", counts, obs={"batch": ["a"] * counts.shape[0]})
    dataset = {"path": path, "slice": {"obs_filters": {"batch": ["zzz"]}}}
    _run_expecting_error(workflow_copy, dataset, ("slice.obs_filters.batch", "scnbvi error in rule slice"), "selection.h5ad")


@pytest.mark.parametrize(
    "setting, where",
    [
        ({"inference": {"batch_size": "many"}}, "datasets.bad.inference.batch_size"),
        ({"inference": {"learning_rte": 0.1}}, "datasets.bad.inference"),
        ({"slice": {"genes": {"method": "best"}}}, "datasets.bad.slice.genes.method"),
        # No cell draws would leave the posterior predictive check nothing to replicate.
        ({"inference": {"cell_draws_max_cells": 0}}, "datasets.bad.inference.cell_draws_max_cells"),
        # Two contrasts whose file names would be the same: refused before anything runs.
        ({"contrasts": [["cond", "a/b", "c"], ["cond", "a_b", "c"]]}, "datasets.bad.contrasts"),
        ({"contrasts": {"my contrast": ["cond", "a", "c"]}}, "datasets.bad.contrasts"),
        # The pseudobulk agreement table of x is de/pseudobulk/x_agreement.tsv.
        ({"design": {"random": ["donor"]}, "contrasts": {"x": ["cond", "a", "c"], "x_agreement": ["cond", "c", "a"]}},
         "datasets.bad.contrasts"),
    ],
)
def test_invalid_config_gives_one_clear_line(workflow_copy, setting, where):
    config = write_config(workflow_copy, {"datasets": {"bad": {"path": "x.h5ad", **setting}}})
    result = snakemake(workflow_copy, "--configfile", config, "-n")
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("config: ")]
    assert len(lines) == 1 and lines[0].startswith(f"config: {where}:"), result.stderr
    assert not (workflow_copy / "results").exists()


def test_donors_as_random_effect_with_the_pseudobulk_cross_check(workflow_copy):
    config = {"backend": "jax", "datasets": {"donors": {
        "simulate": {"n_cells": 600, "n_genes": 60, "seed": 5, "donors": 6, "donor_effect_sd": 0.3},
        "covariates": {"depth": {"source": "obs", "column": "depth", "per_cell": True},
                       "gene_length": {"source": "var", "column": "length"}},
        "design": {"categorical": ["condition"], "random": ["donor"], "reference": {"condition": "control"}},
        "contrasts": [["condition", "treated", "control"]],
        "inference": {"max_iterations": 3000, "draws": 200}}}}
    result = snakemake(workflow_copy, "--configfile", write_config(workflow_copy, config))
    assert result.returncode == 0, result.stderr
    out = workflow_copy / "results" / "donors" / "de"
    de = pd.read_csv(out / "condition_treated_vs_control.tsv", sep="\t", index_col=0)
    assert {"svalue", "sample_sd", "df", "log2_fold_change_unshrunk"} <= set(de.columns) and len(de) == 60
    pseudobulk = pd.read_csv(out / "pseudobulk" / "condition_treated_vs_control.tsv", sep="\t", index_col=0)
    assert {"log2FoldChange", "padj"} <= set(pseudobulk.columns) and set(pseudobulk.index) == set(de.index)
    agreement = pd.read_csv(out / "pseudobulk" / "condition_treated_vs_control_agreement.tsv", sep="\t")
    assert agreement.loc[0, "genes_compared"] == 60 and agreement.loc[0, "spearman_log2_fold_change"] > 0.5
    log = (workflow_copy / "results" / "donors" / "logs" / "de" / "condition_treated_vs_control.log").read_text()
    assert "replicates: samples (3 treated vs 3 control)" in log


def test_an_input_replaced_by_other_counts_with_an_older_time_reruns_load(workflow_copy):
    """cp -p, rsync -t or a restore from backup give the new file an old modification time."""
    path = write_h5ad(workflow_copy / "data.h5ad", _good_counts())
    config = write_config(workflow_copy, {"datasets": {"mine": {"path": path, "inference": {"max_iterations": 300}}}})
    assert snakemake(workflow_copy, "--configfile", config, "--until", "load").returncode == 0
    unchanged = snakemake(workflow_copy, "--configfile", config, "--until", "load", "-n")
    assert "rule load:" not in unchanged.stdout + unchanged.stderr
    before = os.stat(path)
    write_h5ad(workflow_copy / "data.h5ad", sp.csr_matrix(_good_counts().toarray()[::-1]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns - 10**12))
    rerun = snakemake(workflow_copy, "--configfile", config, "--until", "load", "-n")
    assert "rule load:" in rerun.stdout + rerun.stderr, rerun.stdout


def test_a_zarr_store_runs_to_the_results_streamed_and_a_rewritten_store_reruns_load(workflow_copy):
    """A .zarr input (a directory) read through every rule, the fit and DE streaming it."""
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (40, 8)).astype(np.float32))
    obs = {"condition": np.resize(["control", "treated"], 40)}
    path = write_zarr(make_adata(counts, obs), workflow_copy / "data.zarr")
    dataset = {"path": path, "design": {"categorical": ["condition"]},
               "contrasts": [["condition", "treated", "control"]],
               "inference": {"max_iterations": 300, "stream_above_gb": 0}}
    config = write_config(workflow_copy, {"datasets": {"mine": dataset}})
    result = snakemake(workflow_copy, "--configfile", config)
    assert result.returncode == 0, result.stderr[-3000:]
    out = workflow_copy / "results" / "mine"
    assert all((out / name).stat().st_size > 0 for name in OUTPUTS)
    assert "streaming the counts from" in (out / "logs" / "fit.log").read_text()
    assert_no_copy_of_the_counts(workflow_copy / "results", inputs=set())

    # Snakemake sees the store's directory only: other counts written with old times still rerun load.
    earlier = os.stat(path).st_mtime_ns - 10**12
    write_zarr(make_adata(sp.csr_matrix(counts.toarray()[::-1]), obs), workflow_copy / "data.zarr")
    for folder, _, names in os.walk(path):
        for name in [".", *names]:
            os.utime(os.path.join(folder, name), ns=(earlier, earlier))
    rerun = snakemake(workflow_copy, "--configfile", config, "-n")
    assert "rule load:" in rerun.stdout + rerun.stderr, rerun.stdout
