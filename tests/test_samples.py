"""Samples as random effects: the second level's contrast, its spread between samples and the
variance prior shared across genes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from scnbvi.samples import fit_variance_prior, sample_contrast, trigamma_inverse


def test_trigamma_inverse_inverts_trigamma():
    x = np.array([0.05, 0.7, 3.0, 40.0])
    from scipy.special import polygamma

    np.testing.assert_allclose(trigamma_inverse(polygamma(1, x)), x, rtol=1e-7)


def test_variance_prior_is_recovered_from_many_genes():
    rng = np.random.default_rng(0)
    prior_df, prior_variance, df = 8.0, 0.09, 6
    true_variance = prior_df * prior_variance / rng.chisquare(prior_df, 20000)
    observed = true_variance * rng.chisquare(df, 20000) / df
    variance, fitted_df = fit_variance_prior(observed, df)
    assert np.all(variance == pytest.approx(prior_variance, rel=0.05))
    assert fitted_df == pytest.approx(prior_df, rel=0.15)
    # Variances no more spread than sampling explains: the prior is a point (infinite df).
    assert fit_variance_prior(0.09 * rng.chisquare(df, 20000) / df, df)[1] > 200



def test_variance_prior_follows_the_measurement_noise_it_is_given():
    """Between-sample variance = a shared biological part + each gene's own counting noise: with
    the noise as the trend the prior is nearly exact (large df); without it the same genes look
    wildly different and the prior is wide (small df)."""
    rng = np.random.default_rng(1)
    noise = np.exp(rng.uniform(np.log(0.01), np.log(2.0), 20000))
    df = 6
    observed = (0.05 + noise) * rng.chisquare(df, 20000) / df
    trended, trended_df = fit_variance_prior(observed, df, trend=np.log(noise))
    assert trended_df > 30 > fit_variance_prior(observed, df)[1]
    np.testing.assert_allclose(np.median(trended / (0.05 + noise)), 1.0, atol=0.1)
    # A trend without spread (e.g. a single draw) carries no information: one prior for all.
    flat_variance, flat_df = fit_variance_prior(observed, df, trend=np.zeros(20000))
    assert np.ptp(flat_variance) == 0 and flat_df == fit_variance_prior(observed, df)[1]

def _samples(seed, n_genes=4000, sd=0.4, effect_share=0.1):
    rng = np.random.default_rng(seed)
    condition = np.repeat([0.0, 1.0], 4)
    effect = np.where(rng.random(n_genes) < effect_share, rng.normal(0, 1.5, n_genes), 0.0)
    effects = rng.normal(0, 2, n_genes)[:, None] + effect[:, None] * condition + rng.normal(0, sd, (n_genes, 8))
    effects -= effects[:, :1]  # only differences from the first sample are known
    return effects, condition[:, None], effect


def test_sample_contrast_recovers_the_spread_and_covers_the_effects():
    effects, design, effect = _samples(1)
    result = sample_contrast(effects, design, np.array([1.0]))
    assert result.prior_sd == pytest.approx(0.4, rel=0.1)
    assert np.median(result.sample_sd) == pytest.approx(0.4, rel=0.15)
    t = (result.estimate - effect) / result.se
    inside = np.abs(t) < stats.t.ppf(0.95, result.df)
    assert 0.88 <= inside.mean() <= 0.92


def test_too_few_samples_for_the_design_are_refused():
    effects = np.zeros((10, 2))
    with pytest.raises(ValueError, match="no residual degrees of freedom"):
        sample_contrast(effects, np.array([[0.0], [1.0]]), np.array([1.0]))
