"""Posterior predictive checks: calibrated on data from the true parameters, alarmed by a wrong
dispersion, the same moments and bands as counts replicated by numpy, reproducible, and run by the
workflow."""

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
from scnbvi.likelihood.sampling import sample_counts
from scnbvi.ppc import (
    GENE_STATISTICS,
    PosteriorDraws,
    centred_covariates,
    check,
    compare,
    gene_statistics,
    library_size_histogram,
    posterior_draws,
    replicated_moments,
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


def _sampled_statistics(draws, cell_log_offset, gene_log_offset, covariates, seed, replicates=1):
    """Each draw's statistics over ``replicates`` data sets of NB counts drawn by numpy (replicates
    x draws x items): the direct computation the closed forms stand for."""
    rng = np.random.default_rng(seed)
    genes = {name: np.zeros((replicates, draws.n_draws, len(gene_log_offset))) for name in GENE_STATISTICS}
    library = np.zeros((replicates, draws.n_draws, len(cell_log_offset)))
    for r in range(replicates):
        for d in range(draws.n_draws):
            log_mu = (draws.cell_effect[d] + cell_log_offset)[:, None] + (draws.gene_effect[d] + gene_log_offset)
            if covariates is not None:
                log_mu = log_mu + covariates @ draws.beta[d].T
            y = sample_counts(rng, np.exp(log_mu), draws.alpha[d])
            for name, value in gene_statistics(y).items():
                genes[name][r, d] = value
            library[r, d] = y.sum(axis=1)
    return genes, library


def _spread_draws(truth, n_draws, seed=5):
    """Draws scattered around the truth, as a posterior's are."""
    rng = np.random.default_rng(seed)
    return PosteriorDraws(
        gene_effect=truth["gene_effect"] + rng.normal(0, 0.1, (n_draws, N_GENES)),
        cell_effect=truth["cell_effect"] + rng.normal(0, 0.05, (n_draws, N_CELLS)),
        alpha=truth["alpha"] * rng.lognormal(0, 0.2, (n_draws, N_GENES)),
        beta=truth["beta"] + rng.normal(0, 0.05, (n_draws, N_GENES, 2)),
        coefficients=truth["design"].names,
    )


def test_moments_are_those_of_counts_replicated_by_numpy(truth):
    """Per draw, the closed-form mean and sd of each statistic against 2,000 numpy replicates
    (one shared dispersion in the first draw, one per gene in the second; no covariates)."""
    rng = np.random.default_rng(6)
    cells = slice(0, 60)
    draws = PosteriorDraws(
        gene_effect=truth["gene_effect"] + rng.normal(0, 0.1, (2, N_GENES)),
        cell_effect=truth["cell_effect"][cells] + rng.normal(0, 0.1, (2, 60)),
        alpha=np.stack([np.full(N_GENES, 0.7), truth["alpha"]]),
    )
    offsets = truth["cell_log_offset"][cells], truth["gene_log_offset"]
    moments, (library_means, library_sds) = replicated_moments(draws, *offsets, None, block_entries=60 * 17)
    sampled, library = _sampled_statistics(draws, *offsets, None, seed=7, replicates=2000)
    for name in GENE_STATISTICS:
        means, sds = moments[name]
        # The replicates' mean lies within 5 of its standard errors; their sd within 10 % (the
        # variance over 60 cells is skewed: its sd's sampling error and approximation are larger).
        assert np.all(np.abs(sampled[name].mean(axis=0) - means) <= 5 * sds / np.sqrt(2000) + 1e-9), name
        np.testing.assert_allclose(sampled[name].std(axis=0), sds, rtol=0.1 if name != "variance" else 0.2, err_msg=name)
    assert np.all(np.abs(library.mean(axis=0) - library_means) <= 5 * library_sds / np.sqrt(2000))
    np.testing.assert_allclose(library.std(axis=0), library_sds, rtol=0.1)


def test_bands_and_flags_are_those_of_counts_replicated_by_numpy(truth, counts):
    """Against 100 replicated data sets of 300 cells x 120 genes, one per draw: the same genes
    outside the bands but for a few at their edges, and band limits within the Monte-Carlo error
    of the replicates' quantiles."""
    draws = _spread_draws(truth, N_DRAWS)
    covariates = centred_covariates(truth["design"], draws.coefficients)
    offsets = truth["cell_log_offset"], truth["gene_log_offset"]
    result = check(counts, draws, *offsets, covariates, cell_names=range(N_CELLS), gene_names=range(N_GENES), seed=0)
    sampled, library = _sampled_statistics(draws, *offsets, covariates, seed=8)
    observed = gene_statistics(counts)
    tables = {name: (result.genes, observed[name], sampled[name][0]) for name in GENE_STATISTICS}
    tables["library_size"] = (result.cells, result.cells["library_size_observed"].to_numpy(), library[0])
    for name, (table, observed_value, replicated) in tables.items():
        low, high = np.quantile(replicated, [0.05, 0.95], axis=0)
        # The standard error of a 5 % quantile of 100 about normal replicates is about 0.2 of
        # their sd, 0.07 of the band's width: at most 0.35 of it over all genes and cells (on the
        # log scale for the variance over cells, about normal there); a limit on a lattice moves
        # by up to a step more.
        scale = np.log if name == "variance" else np.asarray
        tolerance = 0.35 * (scale(high) - scale(low)) + 1 / N_CELLS
        assert np.all(np.abs(scale(table[f"{name}_low"]) - scale(low)) <= tolerance), name
        assert np.all(np.abs(scale(table[f"{name}_high"]) - scale(high)) <= tolerance), name
        # Flagged alike, but for a few whose observed value lies at a band's edge.
        differs = table[f"{name}_outside"].to_numpy() != ((observed_value < low) | (observed_value > high))
        at_edge = np.minimum(np.abs(scale(observed_value) - scale(low)), np.abs(scale(observed_value) - scale(high)))
        assert differs.sum() <= 0.06 * len(table) and np.all(at_edge[differs] <= tolerance[differs]), name
        np.testing.assert_allclose(table[f"{name}_p_value"], (replicated >= observed_value).mean(axis=0), atol=0.2)


def test_compare_gives_the_band_of_the_mixture_on_the_lattice():
    """One draw: the normal's quantiles and tail; two draws far apart: a band from one to the other."""
    table = compare(np.array([0.0, 2.0, -2.0]), np.zeros((1, 3)), np.ones((1, 3)), highest=5.0)
    np.testing.assert_allclose(table["low"], 0.0)  # -1.645, clipped: every statistic is at least 0
    np.testing.assert_allclose(table["high"], stats.norm.ppf(0.95), rtol=1e-5)
    np.testing.assert_allclose(table["p_value"], stats.norm.sf([0.0, 2.0, -2.0]), rtol=1e-6)
    assert table["outside"].tolist() == [False, True, True]
    mixture = compare(np.array([50.0]), np.array([[10.0], [90.0]]), np.array([[2.0], [2.0]]), step=1.0)
    # The mixture's 5 % quantile is the lower normal's 10 % one, put on the lattice.
    assert mixture["low"].item() == np.ceil(10 + 2 * stats.norm.ppf(0.1) - 0.5)
    assert mixture["high"].item() == np.ceil(90 + 2 * stats.norm.ppf(0.9) - 0.5)
    assert mixture["predicted"].item() == 50.0 and not mixture["outside"].item()
    np.testing.assert_allclose(mixture["p_value"], 0.5)
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
