"""Adaptive shrinkage: calibrated calls when most genes are null, and the posterior's formulas."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from scnbvi.shrinkage import adaptive_shrinkage, t_scale_mixture


def _sparse_effects(seed, n=5000, share=0.05, effect_sd=1.0):
    rng = np.random.default_rng(seed)
    se = rng.uniform(0.05, 0.5, n)
    effect = np.where(rng.random(n) < share, rng.normal(0.0, effect_sd, n), 0.0)
    return effect, effect + rng.normal(0.0, se), se


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level", [0.01, 0.05, 0.1])
def test_false_sign_share_among_calls_stays_below_the_level(seed, level):
    effect, estimate, se = _sparse_effects(seed)
    shrunk = adaptive_shrinkage(estimate, se)
    called = shrunk.lfsr < level
    wrong = called & (np.sign(shrunk.mean) != np.sign(effect))  # a null gene called counts as wrong
    assert called.sum() > 50
    assert wrong.sum() / called.sum() <= level
    # A Gaussian lfsr without shrinkage calls nulls at the nominal one-sided rate.
    naive = stats.norm.cdf(-np.abs(estimate) / se) < level
    assert np.sum(naive & (effect == 0)) > np.sum(called & (effect == 0))


@pytest.mark.parametrize("df", [3.0, 6.0, 40.0, 1e5])
def test_normal_scale_mixture_is_the_t(df):
    precision, weights = t_scale_mixture(df)
    assert weights.sum() == pytest.approx(1.0) and np.all(precision > 0)
    u = np.linspace(0.0, 5.0, 11)
    mixture = np.sum(weights * stats.norm.pdf(u[:, None], scale=1 / np.sqrt(precision)), axis=1)
    np.testing.assert_allclose(mixture, stats.t.pdf(u, df), rtol=0.03 if df < 6 else 0.002)
    assert t_scale_mixture(np.inf) == (np.ones(1), np.ones(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_t_likelihood_keeps_the_false_share_when_the_se_is_estimated(seed):
    """Standard errors from 8 degrees of freedom: many genes' are well below their true value,
    so a normal likelihood calls nulls; the t likelihood holds the level."""
    rng = np.random.default_rng(seed)
    effect, estimate, true_se = _sparse_effects(seed, share=0.1, effect_sd=1.5)
    se = true_se * np.sqrt(rng.chisquare(8, len(true_se)) / 8)
    for df, holds in ((8.0, True), (np.inf, False)):
        shrunk = adaptive_shrinkage(estimate, se, df=df)
        called = shrunk.lfsr < 0.05
        wrong = called & (np.sign(shrunk.mean) != np.sign(effect))
        assert called.sum() > 50
        assert (wrong.sum() / called.sum() <= 0.05) == holds


def test_t_likelihood_with_many_degrees_of_freedom_is_the_normal_one():
    effect, estimate, se = _sparse_effects(7, n=2000)
    normal = adaptive_shrinkage(estimate, se)
    t = adaptive_shrinkage(estimate, se, df=1e5)
    np.testing.assert_allclose(t.lfsr, normal.lfsr, atol=1e-3)
    np.testing.assert_allclose(t.mean, normal.mean, atol=1e-3)
    with pytest.raises(ValueError, match="positive degrees of freedom"):
        adaptive_shrinkage(estimate, se, df=0.0)


def test_null_data_calls_nothing_and_the_prior_is_all_null():
    rng = np.random.default_rng(3)
    se = rng.uniform(0.1, 1.0, 4000)
    estimate = rng.normal(0.0, se)
    shrunk = adaptive_shrinkage(estimate, se)
    assert shrunk.null_share > 0.95
    assert np.sum(shrunk.lfsr < 0.05) <= 2
    assert np.all(np.abs(shrunk.mean) <= np.abs(estimate))  # shrinkage only pulls towards zero


def test_svalue_is_the_running_mean_of_sorted_lfsr():
    effect, estimate, se = _sparse_effects(4, n=2000)
    shrunk = adaptive_shrinkage(estimate, se)
    order = np.argsort(shrunk.lfsr, kind="stable")
    np.testing.assert_allclose(shrunk.svalue[order], np.cumsum(shrunk.lfsr[order]) / np.arange(1, 2001))
    assert np.all(shrunk.svalue <= np.maximum(shrunk.lfsr, shrunk.svalue.max()))


def test_posterior_of_one_gene_matches_the_mixture_formula():
    effect, estimate, se = _sparse_effects(5, n=3000)
    shrunk = adaptive_shrinkage(estimate, se, lfc_threshold=0.5)
    g = int(np.argmax(np.abs(estimate) / se))
    scales, weights = shrunk.scales, shrunk.weights
    likelihood = weights * stats.norm.pdf(estimate[g], scale=np.sqrt(se[g] ** 2 + scales**2))
    responsibility = likelihood / likelihood.sum()
    shrink = scales**2 / (scales**2 + se[g] ** 2)
    mean = np.sum(responsibility * shrink * estimate[g])
    assert shrunk.mean[g] == pytest.approx(mean, rel=1e-9)
    component = stats.norm(shrink[1:] * estimate[g], np.sqrt(shrink[1:]) * se[g])
    below = responsibility[0] + np.sum(responsibility[1:] * component.cdf(0.0))
    assert shrunk.lfsr[g] == pytest.approx(min(below, 1 - below + responsibility[0]), abs=1e-12)
    large = np.sum(responsibility[1:] * (component.sf(0.5) + component.cdf(-0.5)))
    assert shrunk.prob_large_change[g] == pytest.approx(large, abs=1e-9)
    low = responsibility[0] * (shrunk.ci_low[g] >= 0) + np.sum(responsibility[1:] * component.cdf(shrunk.ci_low[g]))
    assert low == pytest.approx(0.025, abs=1e-6)


def test_weights_sum_to_one_and_bad_input_is_refused():
    effect, estimate, se = _sparse_effects(6, n=500)
    shrunk = adaptive_shrinkage(estimate, se)
    assert shrunk.weights.sum() == pytest.approx(1.0) and shrunk.scales[0] == 0.0
    with pytest.raises(ValueError, match="positive standard errors"):
        adaptive_shrinkage(estimate, np.where(np.arange(500) == 3, 0.0, se))
