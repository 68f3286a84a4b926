"""Posterior predictive checks: calibrated on data from the true parameters, alarmed by a wrong
dispersion, the same numbers as a direct numpy computation, reproducible, and run by the workflow."""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from conftest import SMALL_SIMULATED, snakemake, write_config
from scnbvi.design import Design
from scnbvi.ppc import (
    GENE_STATISTICS,
    PosteriorDraws,
    centred_covariates,
    check,
    compare,
    gene_statistics,
    library_size_histogram,
    posterior_draws,
    replicate,
    select_cells,
)

N_CELLS, N_GENES, N_DRAWS = 300, 120, 100


def _truth(seed=0):
    """Parameters of the model with a two-column design (an indicator and a standardised slope)."""
    rng = np.random.default_rng(seed)
    design = np.column_stack([rng.random(N_CELLS) < 0.4, rng.normal(0.0, 1.0, N_CELLS)]).astype(float)
    return {
        "gene_effect": rng.normal(0.3, 0.8, N_GENES),
        "cell_effect": rng.normal(0.0, 0.3, N_CELLS),
        "alpha": rng.lognormal(np.log(2.0), 0.3, N_GENES),
        "beta": rng.normal(0.0, 0.5, (N_GENES, 2)),
        "cell_log_offset": rng.normal(0.0, 0.3, N_CELLS),
        "gene_log_offset": rng.normal(0.0, 0.2, N_GENES),
        "design": Design(design, ("condition[treated]", "score")),
    }


def _observed(truth, seed=1):
    """Counts drawn from the model, written out here (not through the module under test)."""
    centred = truth["design"].matrix - truth["design"].matrix.mean(axis=0)
    log_mu = (truth["gene_effect"] + truth["gene_log_offset"])[None, :] + (
        truth["cell_effect"] + truth["cell_log_offset"])[:, None] + centred @ truth["beta"].T
    mu = np.exp(log_mu)
    alpha = truth["alpha"][None, :]
    counts = np.random.default_rng(seed).poisson(np.random.default_rng(seed + 100).gamma(alpha, mu / alpha))
    return sp.csr_matrix(counts)


def _trace(truth, alpha_scale=1.0, draws=N_DRAWS):
    """A trace whose every draw is the truth (the dispersion scaled by ``alpha_scale``)."""
    def repeated(value):
        return np.broadcast_to(value, (1, draws, *np.shape(value))).copy()

    return az.from_dict(
        posterior={
            "gene_effect": repeated(truth["gene_effect"]),
            "cell_effect": repeated(truth["cell_effect"]),
            "alpha": repeated(truth["alpha"] * alpha_scale),
            "beta": repeated(truth["beta"]),
        },
        coords={"cell": [f"c{i}" for i in range(N_CELLS)], "gene": [f"g{g}" for g in range(N_GENES)],
                "coefficient": list(truth["design"].names)},
        dims={"gene_effect": ["gene"], "cell_effect": ["cell"], "alpha": ["gene"], "beta": ["gene", "coefficient"]},
    )


def _check(truth, counts, alpha_scale=1.0, seed=0, max_cells=N_CELLS, block_entries=5000):
    idata = _trace(truth, alpha_scale)
    cells = select_cells(idata.posterior["cell"].values, max_cells, seed)
    rows = np.array([int(name[1:]) for name in cells])
    draws = posterior_draws(idata, cells, N_DRAWS, seed)
    covariates = centred_covariates(truth["design"], draws.coefficients)[rows]
    return check(counts[rows], draws, truth["cell_log_offset"][rows], truth["gene_log_offset"], covariates,
                 cell_names=cells, gene_names=idata.posterior["gene"].values, seed=seed, block_entries=block_entries)


@pytest.fixture(scope="module")
def truth():
    return _truth()


@pytest.fixture(scope="module")
def counts(truth):
    return _observed(truth)


def test_replicates_from_the_true_parameters_bracket_the_observed_data(truth, counts):
    result = _check(truth, counts)
    outside = result.verdict["genes_outside_band"]
    # With the truth as every draw, the observed statistic is one more replicate: about 10 % of
    # genes fall outside a 90 % band (fewer for the zero fraction, whose ties widen the band).
    for name in GENE_STATISTICS:
        assert outside[name] <= 0.2, (name, outside)
    assert 0.02 <= outside["mean"] <= 0.2, outside
    assert result.verdict["cells_outside_band"]["library_size"] <= 0.2
    # ... and its rank among the replicates is uniform.
    assert stats.kstest(result.genes["mean_p_value"], "uniform").pvalue > 0.01
    assert stats.kstest(result.cells["library_size_p_value"], "uniform").pvalue > 0.01
    assert np.corrcoef(result.genes["zero_fraction_observed"], result.genes["zero_fraction_predicted"])[0, 1] > 0.95


@pytest.mark.parametrize(("alpha_scale", "at_least"), [(0.1, 0.8), (1000.0, 0.6)])
def test_a_wrong_dispersion_puts_most_zero_fractions_outside_the_band(truth, counts, alpha_scale, at_least):
    """Ten times too much overdispersion predicts too many zeros; Poisson-like counts too few."""
    result = _check(truth, counts, alpha_scale=alpha_scale)
    assert result.verdict["genes_outside_band"]["zero_fraction"] >= at_least, result.verdict
    predicted, observed = result.genes["zero_fraction_predicted"], result.genes["zero_fraction_observed"]
    assert np.mean(predicted > observed if alpha_scale < 1 else predicted < observed) > 0.9
    assert "zero fraction outside the 90 % band for" in result.verdict["verdict"]


def test_observed_statistics_are_the_numpy_formulas(counts):
    dense = counts.toarray()
    observed = gene_statistics(counts)
    np.testing.assert_allclose(observed["zero_fraction"], (dense == 0).mean(axis=0), rtol=0, atol=0)
    np.testing.assert_allclose(observed["mean"], dense.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(observed["variance"], dense.var(axis=0), rtol=1e-10)
    np.testing.assert_allclose(gene_statistics(dense)["variance"], dense.var(axis=0), rtol=1e-10)


def test_replicated_statistics_are_those_of_one_numpy_draw_of_every_count(truth):
    """Replicated in blocks of 7 cells, the counts are those numpy draws for the whole matrix at once."""
    rng = np.random.default_rng(5)
    draws = PosteriorDraws(
        gene_effect=truth["gene_effect"] + rng.normal(0, 0.1, (3, N_GENES)),
        cell_effect=truth["cell_effect"] + rng.normal(0, 0.1, (3, N_CELLS)),
        alpha=rng.uniform(0.5, 5.0, 3),  # one alpha shared by all genes
    )
    summaries, library_sizes = replicate(draws, truth["cell_log_offset"], truth["gene_log_offset"], None, seed=9,
                                         block_entries=7 * N_GENES)
    direct = np.random.default_rng(9)
    for d in range(3):
        mu = np.exp((draws.cell_effect[d] + truth["cell_log_offset"])[:, None]
                    + (draws.gene_effect[d] + truth["gene_log_offset"])[None, :])
        y = direct.negative_binomial(draws.alpha[d], draws.alpha[d] / (draws.alpha[d] + mu))
        np.testing.assert_array_equal(summaries["zero_fraction"][d], (y == 0).mean(axis=0))
        np.testing.assert_allclose(summaries["mean"][d], y.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(summaries["variance"][d], y.var(axis=0), rtol=1e-10)
        np.testing.assert_array_equal(library_sizes[d], y.sum(axis=1))


def test_compare_counts_replicates_at_or_above_and_flags_both_tails():
    replicated = np.arange(100, dtype=float)[:, None] * np.ones((1, 3))
    table = compare(np.array([50.0, -1.0, 200.0]), replicated)
    np.testing.assert_allclose(table["p_value"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(table["low"], np.quantile(np.arange(100), 0.05))
    np.testing.assert_allclose(table["high"], np.quantile(np.arange(100), 0.95))
    assert table["outside"].tolist() == [False, True, True]
    histogram = library_size_histogram(np.array([10.0, 100.0, 1000.0]), np.array([[10.0, 100.0, 1000.0]] * 4), bins=3)
    assert histogram["observed"].tolist() == [1, 1, 1] and histogram["predicted"].tolist() == [1, 1, 1]


def test_same_seed_same_numbers_and_the_seed_matters(truth, counts):
    first = _check(truth, counts, seed=3, max_cells=200)
    again = _check(truth, counts, seed=3, max_cells=200, block_entries=13 * N_GENES)
    pd.testing.assert_frame_equal(first.genes, again.genes)
    pd.testing.assert_frame_equal(first.cells, again.cells)
    assert first.verdict == again.verdict
    other = _check(truth, counts, seed=4, max_cells=200)
    assert not first.cells.index.equals(other.cells.index)
    assert not np.array_equal(first.genes["mean_predicted"], other.genes["mean_predicted"])
    assert len(first.cells) == 200 and list(first.cells.index) == sorted(first.cells.index, key=lambda c: int(c[1:]))


@pytest.mark.slow
def test_workflow_checks_every_data_set(workflow_copy):
    config = write_config(workflow_copy, SMALL_SIMULATED)
    result = snakemake(workflow_copy, "--configfile", config)
    assert result.returncode == 0, result.stderr[-3000:]
    out = workflow_copy / "results" / "sim"
    verdict = json.loads((out / "ppc.json").read_text())
    # 300 cells, 200 draws in the trace: the defaults check every cell with 50 draws.
    assert (verdict["genes"], verdict["cells"], verdict["draws"]) == (40, 300, 50)
    # The simulated data come from the model itself, so the fit leaves few genes outside the band.
    assert verdict["genes_outside_band"]["zero_fraction"] <= 0.25, verdict
    assert verdict["genes_outside_band"]["mean"] <= 0.25, verdict
    genes = pd.read_csv(out / "ppc_genes.tsv", sep="\t", index_col=0)
    assert len(genes) == 40 and genes["zero_fraction_p_value"].between(0, 1).all()
    assert (genes["zero_fraction_low"] <= genes["zero_fraction_high"]).all()
    assert len(pd.read_csv(out / "ppc_cells.tsv", sep="\t", index_col=0)) == 300
    for name in ("ppc_zero_fraction.png", "ppc_mean_variance.png", "ppc_library_size.png"):
        assert (out / name).stat().st_size > 0, name
    assert verdict["verdict"] in (out / "logs" / "ppc.log").read_text()
