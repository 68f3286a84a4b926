"""The Negative-Binomial likelihood in each of its forms against scipy's ``nbinom`` (n = alpha,
p = alpha / (alpha + mu)), from zero counts to large ones and from tiny dispersions to huge
ones, and its sampler's mean and variance against mu and mu + mu^2 / alpha."""

from __future__ import annotations

import itertools

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
from scipy import special, stats

from scnbvi.likelihood.moments import cumulants, log_zero_probability
from scnbvi.likelihood.pytensor_form import observed_entries, sparse_block_nb_logp
from scnbvi.likelihood.sampling import sample_counts

COUNTS = (0, 1, 3, 40, 2_000, 100_000)
MEANS = (1e-3, 0.4, 7.0, 900.0, 5e4)
DISPERSIONS = (1e-4, 0.05, 1.0, 30.0, 1e5, 1e8)
GRID = np.array(list(itertools.product(COUNTS, MEANS, DISPERSIONS)), dtype=float).T


def scipy_logpmf(counts, mu, alpha):
    return stats.nbinom.logpmf(counts, alpha, alpha / (alpha + mu))


def rounding(counts, mu, alpha):
    """How far two correct float64 evaluations may differ: scipy's p = alpha / (alpha + mu)
    carries a relative error of eps, which moves alpha log p + y log(1 - p) by eps (alpha + y
    alpha / mu); and both subtract log-gammas as large as lgamma(y + alpha)."""
    eps = np.finfo(float).eps
    return 4 * eps * (alpha + counts * alpha / mu + np.abs(special.gammaln(counts + alpha)))


def assert_matches_scipy(got, counts, mu, alpha, float32_dense=False):
    """Equal to scipy up to float64 rounding, and, for the forms that sum the count-independent
    term alpha log(1 + mu / alpha) in float32, up to float32 rounding of it."""
    expected = scipy_logpmf(counts, mu, alpha)
    tolerance = 1e-12 * np.abs(expected) + rounding(counts, mu, alpha)
    if float32_dense:
        tolerance += 1e-6 * (1.0 + alpha * np.log1p(mu / alpha))
    worst = np.argmax(np.abs(got - expected) / tolerance)
    assert np.all(np.abs(got - expected) <= tolerance), (
        f"y={counts[worst]}, mu={mu[worst]}, alpha={alpha[worst]}: {got[worst]} instead of {expected[worst]}")


def one_entry_block(jax_forms=False, covariates=False):
    """The block log density of one cell x one gene whose single stored entry is the count (a
    count of 0 is a padding entry, which must add nothing), as symbols and their output."""
    log_mu, alpha, count = pt.dscalar("log_mu"), pt.dscalar("alpha"), pt.dscalar("count")
    cell_log_rate, gene_log_rate = (log_mu / 2)[None], (log_mu / 2)[None]
    parts = {}
    if covariates:
        # The covariates carry a third of log mu, the cell and the gene the rest.
        cell_log_rate, gene_log_rate = (log_mu / 3)[None], (log_mu / 3)[None]
        parts = {"covariates": pt.ones((1, 1)), "beta": (log_mu / 3)[None, None]}
    index = pt.zeros(1, dtype="int64")
    logp = sparse_block_nb_logp(cell_log_rate, gene_log_rate, alpha[None], index, index, count[None],
                                jax_forms=jax_forms, **parts)
    return [log_mu, alpha, count], logp


@pytest.mark.parametrize("form", ["plain", "covariates", "engine-ops"])
def test_pytensor_block_log_density_equals_scipy(form):
    """The cells layout's graph, plain (with and without covariates) and with the engine's ops
    evaluated by PyTensor (their dense part in float32)."""
    inputs, logp = one_entry_block(jax_forms=form == "engine-ops", covariates=form == "covariates")
    function = pytensor.function(inputs, logp)
    counts, mu, alpha = GRID
    got = np.array([function(np.log(m), a, y) for y, m, a in zip(counts, mu, alpha)])
    assert_matches_scipy(got, counts, mu, alpha, float32_dense=form == "engine-ops")


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_jax_block_log_density_equals_scipy(monkeypatch, backend):
    """The JAX engine's form of the block (the tiled dense part on CPU, the whole one on other
    devices, and the count part with its own log-gamma)."""
    import jax

    from scnbvi.inference.jax_graph import jaxify

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    inputs, logp = one_entry_block(jax_forms=True)
    function = jax.jit(jax.vmap(jaxify(inputs, [logp])))
    counts, mu, alpha = GRID
    (got,) = function(np.log(mu), alpha, counts)
    assert_matches_scipy(np.asarray(got), counts, mu, alpha, float32_dense=True)


def test_entries_log_density_equals_scipy():
    """The entries layout's observed term, one value per entry (total size: the entries themselves)."""
    counts, mu, alpha = GRID
    with pm.Model():
        y = observed_entries("y", pt.as_tensor(np.log(mu)), pt.as_tensor(alpha), counts, total_size=len(counts))
    assert_matches_scipy(pm.logp(y, counts).eval(), counts, mu, alpha)


@pytest.mark.parametrize(("mu", "alpha"), [(0.2, 0.5), (6.0, 2.0), (80.0, 0.3), (40.0, 500.0)])
def test_sampler_mean_and_variance_are_mu_and_mu_plus_mu_squared_over_alpha(mu, alpha):
    """200,000 draws: the mean within 1 % of mu and the variance within 5 % of mu + mu^2 / alpha;
    alpha read as 1 / alpha, or p as 1 - p, misses both by far more."""
    counts = sample_counts(np.random.default_rng(3), np.full(200_000, mu), alpha)
    np.testing.assert_allclose(counts.mean(), mu, rtol=0.01)
    np.testing.assert_allclose(counts.var(), mu + mu**2 / alpha, rtol=0.05)


def test_sampler_takes_a_dispersion_per_gene():
    """One dispersion per column (gene) of a cells x genes matrix of means, as the simulator
    passes them."""
    mu = np.tile([3.0, 50.0], (100_000, 1))
    alpha = np.array([0.5, 20.0])
    counts = sample_counts(np.random.default_rng(4), mu, alpha)
    np.testing.assert_allclose(counts.mean(axis=0), mu[0], rtol=0.02)
    np.testing.assert_allclose(counts.var(axis=0), mu[0] + mu[0] ** 2 / alpha, rtol=0.05)


def test_zero_probability_and_cumulants_equal_scipy():
    """The closed forms the posterior predictive check sums, over the grid's means and
    dispersions: log P(0) against scipy's logpmf at 0, the cumulants against its variance,
    skewness and excess kurtosis; and the zero probability in float32 through JAX."""
    import jax.numpy as jnp

    mu, alpha = (values.ravel() for values in np.meshgrid(MEANS, DISPERSIONS))
    # scipy's own rounding (of p, read alpha times) dominates at large dispersions.
    np.testing.assert_allclose(log_zero_probability(mu, alpha), scipy_logpmf(0, mu, alpha), rtol=1e-12,
                               atol=rounding(0, mu, alpha).max())
    np.testing.assert_allclose(np.asarray(log_zero_probability(jnp.asarray(mu, jnp.float32),
                                                               jnp.asarray(alpha, jnp.float32), jnp)),
                               scipy_logpmf(0, mu, alpha), rtol=1e-5)
    variance, skewness, kurtosis = stats.nbinom.stats(alpha, alpha / (alpha + mu), moments="vsk")
    second, third, fourth = cumulants(mu, alpha)
    # scipy computes them from p, whose rounding it multiplies by alpha: 1e-8 at alpha = 1e8.
    np.testing.assert_allclose(second, variance, rtol=1e-6)
    np.testing.assert_allclose(third, skewness * variance**1.5, rtol=1e-6)
    np.testing.assert_allclose(fourth, kurtosis * variance**2, rtol=1e-6)
