"""Differential expression end to end: recovery of known effects and calibration under the null."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_DATA
from scnbvi.de import contrast_table
from scnbvi.design import build_design
from scnbvi.inference import InferenceSettings, fit
from scnbvi.posterior import draw_posterior
from scnbvi.simulate import SimulationTruth, simulate_counts

pytestmark = pytest.mark.fit


def _fit_design(counts, depth, design, gene_names, gene_dispersion=False, seed=0):
    """Posterior draws of the model with ``design``, fitted to convergence by the jax engine."""
    model, result = fit(counts, np.log(depth / 1e5), np.zeros(counts.shape[1]), InferenceSettings(seed=seed),
                        backend="jax", gene_names=gene_names, design=design, gene_dispersion=gene_dispersion)
    assert result.converged
    return draw_posterior(model, result, 1000, seed)


def _true_log2_fold_change(adata, column, numerator, denominator) -> np.ndarray:
    """The simulated contrast: each level's true effect (the reference's is zero), in log2."""
    def effect(level):
        name = f"true_beta_{column}[{level}]"
        return adata.var[name].to_numpy() if name in adata.var else np.zeros(adata.n_vars)

    return (effect(numerator) - effect(denominator)) / np.log(2.0)


def test_known_covariate_effects_are_recovered_with_calibrated_intervals():
    truth = SimulationTruth(condition_effect_sd=0.7, batch_effect_sd=0.3)
    adata = simulate_counts(2000, 300, seed=1, truth=truth)
    design = build_design(adata.obs, categorical=["condition", "batch"],
                          reference={"condition": "control", "batch": "b1"})
    # Gene lengths are left out: a per-gene constant, absorbed by the gene effects.
    depth = adata.obs["depth"].to_numpy()
    idata = _fit_design(adata.X, depth, design, adata.var_names)
    beta = idata.posterior["beta"].values[0]
    for k, name in enumerate(design.names):
        true = adata.var[f"true_beta_{name}"].to_numpy()
        low, high = np.quantile(beta[:, :, k], [0.05, 0.95], axis=0)
        coverage = np.mean((low < true) & (true < high))
        assert 0.85 <= coverage <= 0.95, (name, coverage)
        large = np.abs(true) >= 0.5
        assert large.sum() >= 10, name
        assert np.mean(np.sign(beta[:, large, k].mean(axis=0)) == np.sign(true[large])) >= 0.95, name
    # A level against the reference, and two levels that are both coefficients.
    for contrast in (("condition", "treated", "control"), ("batch", "b3", "b2")):
        table = contrast_table(idata, design, contrast, adata.X, depth, centre="none").table
        true = pd.Series(_true_log2_fold_change(adata, *contrast), index=adata.var_names).loc[table.index]
        large = np.abs(true) >= 1.0
        assert large.sum() >= 20, contrast
        assert np.mean(np.sign(table["log2_fold_change"][large]) == np.sign(true[large])) >= 0.95, contrast
        called = table["lfsr"] < 0.05
        assert called[large].mean() >= 0.8, contrast
        assert np.mean(np.sign(table["log2_fold_change"][called]) == np.sign(true[called])) >= 0.95, contrast


@pytest.mark.shared_data("microglia_20k.h5ad")
def test_a_permuted_label_calls_almost_no_gene_on_real_cells():
    """Calibration under the null: a condition label shuffled at random over real droplet cells
    has no effect, so at most 5 % of genes may get lfsr < 0.05."""
    from scnbvi.data import read_counts
    from scnbvi.qc import slice_counts

    adata = read_counts(SHARED_DATA / "microglia_20k.h5ad")
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(float)  # depth over all genes
    adata = adata[adata.obs["study_inferred"] == "S2_droplet"].copy()
    adata = slice_counts(adata, cells_method="random", n_cells=1500, genes_method="hvg", n_genes=300, seed=0,
                         drop_zero_cells=True)
    rng = np.random.default_rng(0)
    adata.obs["label"] = rng.permutation(np.array(["a", "b"])[np.arange(adata.n_obs) % 2])
    design = build_design(adata.obs, categorical=["label"], reference={"label": "a"})
    depth = adata.obs["total_counts"].to_numpy()
    # Real genes differ in dispersion: one shared alpha would make the model overconfident for
    # the most variable ones.
    idata = _fit_design(adata.X, depth, design, adata.var_names, gene_dispersion=True)
    table = contrast_table(idata, design, ("label", "b", "a"), adata.X, depth).table
    assert np.mean(table["lfsr"] < 0.05) <= 0.05, table.head()


def test_donors_as_random_effect_recover_their_spread_and_stop_pseudoreplication():
    """Simulated donors (3 control, 3 treated) that shift every gene by N(0, 0.4) and a condition
    without any effect: with the donor named, the spread between donors is recovered and almost
    nothing is called; with cells as replicates, the donors' differences become calls."""
    truth = SimulationTruth(donors=6, donor_effect_sd=0.4)
    adata = simulate_counts(1200, 150, seed=4, truth=truth)
    depth = adata.obs["depth"].to_numpy()
    contrast = ("condition", "treated", "control")
    design = build_design(adata.obs, categorical=["condition"], random=["donor"], reference={"condition": "control"})
    assert design.is_sample_level("condition")
    result = contrast_table(_fit_design(adata.X, depth, design, adata.var_names), design, contrast, adata.X, depth,
                            centre="none")
    assert result.replicates == "samples" and result.units == {"treated": 3, "control": 3}
    assert result.sample_sd == pytest.approx(0.4 / np.log(2), rel=0.25)
    assert np.mean(result.table["lfsr"] < 0.05) <= 0.05
    cells = build_design(adata.obs, categorical=["condition"], reference={"condition": "control"})
    pseudoreplicated = contrast_table(_fit_design(adata.X, depth, cells, adata.var_names), cells, contrast, adata.X,
                                      depth, centre="none")
    assert np.mean(pseudoreplicated.table["lfsr"] < 0.05) > 0.3
