"""The flat direction of the likelihood (cell effects up, gene effects down) settled by the priors."""

from __future__ import annotations

import numpy as np
import pytest

from scnbvi.inference.recentring import recentre_cell_effects
from scnbvi.inference.result import FitResult
from scnbvi.inference.settings import InferenceSettings
from scnbvi.model import PRIOR_MU_SD, RAW_CELL_EFFECT

SIGMA_COND = 0.5


def _drifted(seed=0, n_cells=5000, n_genes=40, drift=0.88, weak_share=0.0):
    """q as a fit of one or two epochs leaves it: each cell's posterior given gene effects lowered
    by ``drift`` and sigma_cond = 0.5, from Gaussian likelihoods around 0.37-sd true effects;
    pinned cells (sd 0.02), and a share of cells whose likelihood is as wide as the prior.
    Returns the result, the centring weights, and each cell's likelihood precision and estimate."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.05, 0.99, n_cells)
    likelihood_sd = np.where(rng.random(n_cells) < weak_share, SIGMA_COND, 0.02)
    precision = 1.0 / likelihood_sd**2
    estimate = rng.normal(0.0, 0.37, n_cells) + drift + rng.normal(0.0, likelihood_sd)
    variance = 1.0 / (precision + 1.0 / SIGMA_COND**2)
    per_raw_unit = SIGMA_COND ** (1 - weights)
    cell_mean = variance * precision * estimate
    means = {RAW_CELL_EFFECT: cell_mean / per_raw_unit, "sigma_cond_log__": np.asarray(np.log(SIGMA_COND)),
             "gene_effect": rng.normal(-2.0, 1.0, n_genes) - drift, "mu_gene": np.asarray(-2.0 - drift)}
    stds = {RAW_CELL_EFFECT: np.sqrt(variance) / per_raw_unit, "sigma_cond_log__": np.asarray(0.01),
            "gene_effect": np.full(n_genes, 0.1), "mu_gene": np.asarray(0.1)}
    result = FitResult(means, stds, losses=np.ones(3), checks=[], epochs=1.0, converged=True, fit_seconds=0.0,
                       compile_seconds=0.0, engine="jax", backend="c", settings=InferenceSettings(), decays=0,
                       final_learning_rate=0.05)
    return result, weights, precision, estimate


def _cell_effect(result, weights):
    return SIGMA_COND ** (1 - weights) * result.means[RAW_CELL_EFFECT]


def test_pinned_cells_keep_their_rates_and_centre_on_zero():
    result, weights, _, _ = _drifted()
    recentred = recentre_cell_effects(result, weights)
    before, after = _cell_effect(result, weights), _cell_effect(recentred, weights)
    shift = float(recentred.means["mu_gene"] - result.means["mu_gene"])
    assert shift == pytest.approx(0.88, abs=0.02) and abs(before.mean() - 0.88) < 0.02
    np.testing.assert_allclose(recentred.means["gene_effect"], result.means["gene_effect"] + shift)
    # Each cell moves by k (1 - s_i^2 / sigma^2): all but 0.16 % of k, so every rate stays within 0.002.
    np.testing.assert_allclose(after + shift, before, atol=2e-3)
    assert abs(after.mean()) < 0.01
    assert all(recentred.stds[name] is result.stds[name] for name in result.stds)


def test_the_shift_is_the_empirical_bayes_optimum_and_weak_cells_follow_their_prior():
    """k maximises sum_i log N(estimate_i - k | 0, sigma^2 + 1/lambda_i) + log N(mu + k | 0, s_mu^2),
    and each cell's mean is its exact posterior given the moved gene effects."""
    result, weights, precision, estimate = _drifted(weak_share=0.3)
    recentred = recentre_cell_effects(result, weights)
    shift = float(recentred.means["mu_gene"] - result.means["mu_gene"])
    marginal_variance = SIGMA_COND**2 + 1.0 / precision
    gradient = np.sum((estimate - shift) / marginal_variance) - float(recentred.means["mu_gene"]) / PRIOR_MU_SD**2
    assert gradient == pytest.approx(0.0, abs=1e-6 * np.sum(1.0 / marginal_variance))
    posterior = (estimate - shift) * precision / (precision + 1.0 / SIGMA_COND**2)
    np.testing.assert_allclose(_cell_effect(recentred, weights), posterior, atol=1e-10)
    weak = precision < 10
    moved = _cell_effect(result, weights) - _cell_effect(recentred, weights)
    np.testing.assert_allclose(moved[weak], shift / 2)  # half their precision is the prior's
