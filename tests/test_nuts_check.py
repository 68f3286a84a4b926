"""ADVI checked against NUTS: the comparison metrics on draws whose answer is known, the seeded
subset, the NUTS model's log density, and the check end to end (package and workflow)."""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import preset, snakemake, write_config
from scnbvi.batches import make_batch
from scnbvi.design import design_from_config
from scnbvi.inference import InferenceSettings
from scnbvi.model import build_model, cell_centring_weights, load_batch
from scnbvi.nuts_check import (
    ADVI_DRAWS,
    MIN_DETECTED_FRACTION,
    NutsSettings,
    check_nuts,
    compare_draws,
    comparison_table,
    make_subset,
    nuts_model,
    quantity_groups,
    select_subset,
)
from scnbvi.offsets import log_offsets
from scnbvi.simulate import SimulationTruth, simulate_counts


def _posterior(chains: int, **variables) -> az.InferenceData:
    """InferenceData from draws (chains * draws first), genes g0, g1, ... on a ``gene`` axis."""
    posterior, dims = {}, {}
    for name, values in variables.items():
        values = np.asarray(values)
        posterior[name] = values.reshape(chains, -1, *values.shape[1:])
        if values.ndim == 2:
            dims[name] = ["gene"]
    n_genes = max((np.shape(v)[1] for v in variables.values() if np.ndim(v) == 2), default=0)
    return az.from_dict(posterior=posterior, dims=dims, coords={"gene": [f"g{g}" for g in range(n_genes)]})


def test_identical_draws_agree_exactly():
    rng = np.random.default_rng(0)
    draws = rng.normal(rng.normal(0, 2, 20), rng.uniform(0.5, 2, 20), size=(4000, 20))
    metrics = compare_draws(draws, draws)
    assert metrics["correlation"] == pytest.approx(1.0)
    assert metrics["sd_ratio"] == pytest.approx(1.0)
    assert metrics["mean_difference_in_sd"] == pytest.approx(0.0)
    assert metrics["nuts_mass_in_advi_interval"] == pytest.approx(0.9, abs=1e-3)
    assert not metrics["missed"].any()


def test_shifted_or_narrow_advi_is_flagged_and_a_faithful_one_is_not():
    rng = np.random.default_rng(1)
    means = rng.normal(0, 1, 12)
    nuts = _posterior(4, gene_effect=rng.normal(means, 0.3, size=(4000, 12)), sigma_gene=rng.gamma(50, 0.02, 4000))
    faithful = _posterior(1, gene_effect=rng.normal(means, 0.3, size=(1000, 12)), sigma_gene=rng.gamma(50, 0.02, 1000))
    table, missed = comparison_table(nuts, faithful)
    assert not table["flagged"].any() and not missed
    assert table.loc["gene_effect (centred)", "correlation"] > 0.99
    assert table.loc["gene_effect (centred)", "sd_ratio"] == pytest.approx(1.0, abs=0.1)

    shifted = means + np.where(np.arange(12) == 3, 1.5, 0.0)  # one gene 5 sds off
    narrow = _posterior(1, gene_effect=rng.normal(shifted, 0.3, size=(1000, 12)),
                        sigma_gene=rng.gamma(5000, 0.0002, 1000))  # same mean, a tenth of the sd
    table, missed = comparison_table(nuts, narrow)
    assert table.loc["gene_effect (centred)", "flagged"] and missed["gene_effect (centred)"] == ["gene_effect[g3]"]
    assert table.loc["sigma_gene", "sd_ratio"] < 0.2
    assert table.loc["sigma_gene", "nuts_mass_in_advi_interval"] < 0.3


def test_quantity_groups_centre_effects_and_take_only_what_the_posterior_has():
    rng = np.random.default_rng(2)
    draws = 50
    posterior = az.from_dict(
        posterior={"gene_effect": rng.normal(3, 1, (1, draws, 4)), "alpha": rng.gamma(2, 1, (1, draws, 4)),
                   "mu_gene": rng.normal(size=(1, draws)),
                   "tau": rng.gamma(2, 1, (1, draws, 2)), "beta": rng.normal(size=(1, draws, 4, 2))},
        coords={"gene": list("abcd"), "coefficient": ["x", "y"]},
        dims={"gene_effect": ["gene"], "alpha": ["gene"], "tau": ["coefficient"], "beta": ["gene", "coefficient"]},
    ).posterior
    groups = quantity_groups(posterior)
    assert list(groups) == ["gene_effect (centred)", "log alpha", "mu_gene", "tau[x]", "beta[x]", "tau[y]",
                            "beta[y]"]
    np.testing.assert_allclose(groups["gene_effect (centred)"].draws.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(groups["log alpha"].draws, np.log(posterior["alpha"].values[0]))
    np.testing.assert_allclose(groups["beta[y]"].draws, posterior["beta"].values[0, :, :, 1])
    assert groups["beta[y]"].elements[0] == "beta[a,y]"


def test_subset_is_seeded_and_picks_expressed_genes():
    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.uniform(0.5, 3.0, 60), size=(500, 60)).astype(float)
    counts[:, :20] = 0
    counts[:4, :10] = 5  # detected in 4 cells at most: never expressed enough
    counts = sp.csr_matrix(counts)
    cells, genes = select_subset(counts, 100, 30, seed=1)
    assert len(cells) == 100 and len(genes) == 30
    assert np.all(np.diff(cells) > 0) and np.all(np.diff(genes) > 0)
    detected = np.asarray((counts[cells][:, genes] > 0).sum(axis=0)).ravel()
    assert detected.min() >= MIN_DETECTED_FRACTION * 100 and genes.min() >= 20
    again = select_subset(counts, 100, 30, seed=1)
    other = select_subset(counts, 100, 30, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip((cells, genes), again))
    assert not np.array_equal(cells, other[0])
    # Asking for more than there is gives all cells and every expressed gene.
    cells, genes = select_subset(counts, 10_000, 10_000, seed=1)
    assert len(cells) == 500 and len(genes) == 40


def _simulated(n_cells: int, n_genes: int):
    adata = simulate_counts(n_cells, n_genes, 4, SimulationTruth(condition_effect_sd=0.5))
    cell_offset, gene_offset = log_offsets(adata.obs["depth"].to_numpy(), adata.var["length"].to_numpy())
    design = design_from_config(adata.obs, {"categorical": ["condition"], "continuous": [],
                                            "reference": {"condition": "control"}})
    return adata, cell_offset, gene_offset, design


@pytest.mark.parametrize("gene_dispersion", [True, False])
def test_nuts_model_logp_is_the_full_data_logp(gene_dispersion):
    """One block of all the subset's cells: the same log density as every (cell, gene) entry of
    the subset given to the NB distribution itself, unscaled."""
    adata, cell_offset, gene_offset, design = _simulated(80, 12)
    subset = make_subset(adata.X, cell_offset, gene_offset, list(adata.obs_names), list(adata.var_names), design,
                         NutsSettings(cells=50, genes=8, seed=1))
    model = nuts_model(subset, gene_dispersion)
    n_cells, n_genes = subset.counts.shape
    entries = build_model(cell_log_offset=subset.cell_log_offset, gene_log_offset=subset.gene_log_offset,
                          mode="entries", batch_size=n_cells * n_genes, gene_dispersion=gene_dispersion,
                          design=subset.design.matrix, coefficient_names=subset.design.names,
                          cell_centring=cell_centring_weights(subset.counts, subset.cell_log_offset))
    load_batch(entries, make_batch("entries", counts=subset.counts.toarray(),
                                   cell_index=np.repeat(np.arange(n_cells), n_genes),
                                   gene_index=np.tile(np.arange(n_genes), n_cells)))
    rng = np.random.default_rng(5)
    start = model.initial_point()
    for _ in range(3):
        point = {name: value + 0.3 * rng.standard_normal(np.shape(value)) for name, value in start.items()}
        assert model.compile_logp()(point) == pytest.approx(entries.compile_logp()(point), rel=1e-9)


@pytest.mark.slow
def test_check_nuts_end_to_end_on_a_small_simulated_data_set():
    adata, cell_offset, gene_offset, design = _simulated(60, 15)
    table, record = check_nuts(
        adata.X, cell_offset, gene_offset, list(adata.obs_names), list(adata.var_names), design,
        nuts=NutsSettings(cells=60, genes=15, chains=2, draws=150, tune=150, seed=1),
        inference=InferenceSettings(max_iterations=3000, draws=300), gene_dispersion=True, cores=2,
    )
    assert {"gene_effect (centred)", "cell_effect (centred)", "log alpha", "sigma_gene", "sigma_cond",
            "tau[condition[treated]]", "beta[condition[treated]]"} <= set(table.index)
    assert table.loc["gene_effect (centred)", "elements"] == record["genes"] == 15
    assert table.loc["cell_effect (centred)", "elements"] == record["cells"] == 60
    assert table.loc["gene_effect (centred)", "correlation"] > 0.95
    assert table["nuts_mass_in_advi_interval"].between(0, 1).all()
    assert np.isfinite(table[["sd_ratio", "rhat_max", "ess_bulk_min"]].to_numpy()).all()
    assert record["chains"] == 2 and record["draws"] == 150 and record["divergences"] >= 0
    assert record["advi_draws"] == ADVI_DRAWS
    assert list(table.index[table["flagged"]]) == record["flagged"]


@pytest.mark.slow
def test_check_nuts_rule_runs_in_the_workflow_when_configured(workflow_copy):
    config = preset("small_simulated")
    planned = snakemake(workflow_copy, "-n", "--configfile", write_config(workflow_copy, config, "off.yaml"))
    assert planned.returncode == 0 and "rule check_nuts:" not in planned.stdout
    config["datasets"]["sim"]["check"] = {"nuts": {"cells": 50, "genes": 10, "chains": 2, "draws": 100, "tune": 100}}
    path = write_config(workflow_copy, config)
    planned = snakemake(workflow_copy, "-n", "--configfile", path)
    assert planned.returncode == 0 and "rule check_nuts:" in planned.stdout, planned.stderr
    out = workflow_copy / "results" / "sim"
    targets = [str(out.relative_to(workflow_copy) / f"check_nuts.{suffix}") for suffix in ("tsv", "json", "png")]
    result = snakemake(workflow_copy, *targets, "--configfile", path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out / "check_nuts.tsv", sep="\t", index_col=0)
    assert {"correlation", "mean_difference_in_sd", "sd_ratio", "nuts_mass_in_advi_interval", "flagged"} <= set(table)
    assert table.loc["cell_effect (centred)", "elements"] == 50
    record = json.loads((out / "check_nuts.json").read_text())
    assert {"rhat_max", "ess_bulk_min", "divergences", "nuts_seconds", "scnbvi_version"} <= set(record)
    assert (out / "check_nuts.png").stat().st_size > 0
