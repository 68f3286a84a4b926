"""The hyperparameters' collapsed posterior against the exact normal-normal marginal, and the
cell effects and their scale integrated over it on a grid against exact quadrature."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from scnbvi.inference import FitResult, InferenceSettings
from scnbvi.inference.hyperparameters import GRID_POINTS, INTERVAL_MASS, collapse_hyperparameters, density_grid
from scnbvi.model import PRIOR_SIGMA_SD, RAW_CELL_EFFECT, build_model

N_CELLS, N_GENES = 30, 60


# The collapsed posterior is differentiated by PyTensor, or by JAX for the jax backend.
BACKENDS = pytest.mark.parametrize("backend", ["c", "jax"])


def _result(means, stds, backend="c") -> FitResult:
    return FitResult(means, stds, losses=np.ones(3), checks=[], epochs=1.0, converged=True, fit_seconds=0.0,
                     compile_seconds=0.0, engine="jax", backend=backend, settings=InferenceSettings(), decays=0,
                     final_learning_rate=0.05)


def _gaussian_gene_effects(seed=0):
    """Gene effects whose likelihood is Gaussian (estimates with known variances), and their
    exact posterior given the hyperparameters at (mu, sigma) = (0.3, 0.8): what q holds."""
    rng = np.random.default_rng(seed)
    variance = rng.uniform(0.05, 3.0, N_GENES)
    estimate = rng.normal(0.5, np.sqrt(1.0 + variance))
    mu, sigma = 0.3, 0.8
    precision = 1.0 / variance + 1.0 / sigma**2
    posterior_mean = (estimate / variance + mu / sigma**2) / precision
    return estimate, variance, (mu, sigma), posterior_mean, 1.0 / np.sqrt(precision)


def _exact_log_posterior(hyper, estimate, variance):
    """log N(estimate | mu, sigma^2 + variance) + the priors of mu (N(0, 1)) and sigma
    (HalfNormal(1), with the log transform's Jacobian), in (mu, log sigma)."""
    mu, log_sigma = hyper
    sigma = np.exp(log_sigma)
    return (stats.norm.logpdf(estimate, mu, np.sqrt(sigma**2 + variance)).sum() + stats.norm.logpdf(mu)
            + stats.halfnorm.logpdf(sigma) + log_sigma)


@BACKENDS
def test_collapsed_sds_are_the_exact_marginal_curvature_when_effects_are_gaussian(backend):
    """With a Gaussian likelihood per effect, integrating the effects out is exact: the sds must
    come from the curvature of the normal-normal marginal at q's means, which stay as they are."""
    estimate, variance, (mu, sigma), posterior_mean, posterior_sd = _gaussian_gene_effects()
    model = build_model(cell_log_offset=np.zeros(N_CELLS), gene_log_offset=np.zeros(N_GENES), gene_dispersion=False,
                        cell_centring=np.linspace(0.2, 1.0, N_CELLS))
    means = {name: np.asarray(value, dtype=float) for name, value in model.initial_point().items()}
    stds = {name: np.full(np.shape(value), 0.1) for name, value in means.items()}
    means.update(mu_gene=np.asarray(mu), sigma_gene_log__=np.asarray(np.log(sigma)), gene_effect=posterior_mean)
    stds["gene_effect"] = posterior_sd
    collapsed = collapse_hyperparameters(model, _result(means, stds, backend))

    at = np.array([mu, np.log(sigma)])
    step, hessian = 1e-4, np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            shifts = [np.eye(2)[i] * step * a + np.eye(2)[j] * step * b for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
            f = [_exact_log_posterior(at + d, estimate, variance) for d in shifts]
            hessian[i, j] = (f[0] - f[1] - f[2] + f[3]) / (4 * step**2)
    exact_sd = np.sqrt(np.diag(np.linalg.inv(-hessian)))
    np.testing.assert_allclose([collapsed.stds["mu_gene"], collapsed.stds["sigma_gene_log__"]], exact_sd, rtol=1e-4)
    # Means, the effects and the parameters outside a hierarchy keep their q (sigma_cond and the
    # cell effects are integrated on a grid, see below).
    assert all(np.array_equal(collapsed.means[name], means[name]) for name in means
               if name not in ("sigma_cond_log__", RAW_CELL_EFFECT))
    np.testing.assert_array_equal(collapsed.stds["gene_effect"], posterior_sd)
    np.testing.assert_array_equal(collapsed.stds["alpha_log__"], stds["alpha_log__"])


def test_mean_field_sd_of_a_scale_is_too_narrow_and_the_collapsed_one_is_not():
    """Weakly informed effects (likelihood variances up to about 5x the prior's): mean-field's sd of log sigma is
    the curvature at fixed effects, well below the marginal's; the collapsed sd is the marginal's."""
    estimate, variance, (mu, sigma), posterior_mean, posterior_sd = _gaussian_gene_effects(seed=1)
    model = build_model(cell_log_offset=np.zeros(N_CELLS), gene_log_offset=np.zeros(N_GENES), gene_dispersion=False)
    means = {name: np.asarray(value, dtype=float) for name, value in model.initial_point().items()}
    stds = {name: np.full(np.shape(value), 0.1) for name, value in means.items()}
    means.update(mu_gene=np.asarray(mu), sigma_gene_log__=np.asarray(np.log(sigma)), gene_effect=posterior_mean)
    stds["gene_effect"] = posterior_sd
    # Mean-field's sd of log sigma: 1 / sqrt(2 sum E[(x - mu)^2] / sigma^2), about 1 / sqrt(2 n).
    mean_field_sd = 1.0 / np.sqrt(2 * np.sum((posterior_mean - mu) ** 2 + posterior_sd**2) / sigma**2)
    collapsed_sd = float(collapse_hyperparameters(model, _result(means, stds)).stds["sigma_gene_log__"])
    assert collapsed_sd > 1.5 * mean_field_sd


def test_density_grid_reaches_the_tails_of_a_skewed_density():
    """A log-gamma density (long left tail, like log sigma_cond in a funnel): the grid's weights
    give its mean and quantiles, whatever the start and step."""
    shape = 2.0
    log_density = stats.loggamma(shape).logpdf
    points, weights = density_grid(log_density, center=1.0, sd=0.5)
    assert weights.sum() == pytest.approx(1.0) and np.all(np.diff(points) > 0)
    assert weights @ points == pytest.approx(stats.loggamma(shape).mean(), abs=1e-4)
    median = np.interp(0.5, np.cumsum(weights) - weights / 2, points)
    assert median == pytest.approx(stats.loggamma(shape).median(), abs=1e-3)


def test_density_grid_finds_a_mode_far_from_its_start():
    """On atlas-sized data q's mean of log sigma_cond sat 400 of its sds below the collapsed
    density's mode; the grid must cover the density, not the few thousand small steps near q."""
    density = stats.norm(loc=-0.25, scale=0.004)
    points, weights = density_grid(density.logpdf, center=-0.626, sd=0.0009)
    assert len(points) == GRID_POINTS
    assert points[0] < density.ppf(1e-6) and points[-1] > density.ppf(1 - 1e-6)
    median = np.interp(0.5, np.cumsum(weights) - weights / 2, points)
    assert median == pytest.approx(-0.25, abs=1e-4)
    assert np.sqrt(weights @ points**2 - (weights @ points) ** 2) == pytest.approx(0.004, rel=1e-3)


@BACKENDS
def test_cell_effects_and_their_scale_are_integrated_over_its_exact_marginal(backend):
    """Weakly informed cells with a Gaussian likelihood (variances 0.5-3 against a scale near
    0.4) and q at their exact posterior given sigma_cond = 0.5: sigma_cond's q gets the median and
    the central-interval width of its exact marginal (heavy-tailed towards zero), and the raw cell
    effects the mean and sd of their exact posterior with sigma_cond integrated out (quadrature
    on a fine grid; raw_i = cell_i / sigma_cond^(1 - w_i))."""
    rng = np.random.default_rng(3)
    variance = rng.uniform(0.5, 3.0, N_CELLS)
    estimate = rng.normal(0.0, np.sqrt(0.4**2 + variance))
    centring = np.linspace(0.2, 1.0, N_CELLS)
    gene_estimate, gene_variance, (mu, sigma), gene_mean, gene_sd = _gaussian_gene_effects()
    model = build_model(cell_log_offset=np.zeros(N_CELLS), gene_log_offset=np.zeros(N_GENES), gene_dispersion=False,
                        cell_centring=centring)
    sigma_hat = 0.5
    precision = 1.0 / variance + 1.0 / sigma_hat**2
    per_raw_unit = sigma_hat ** (1.0 - centring)
    means = {name: np.asarray(value, dtype=float) for name, value in model.initial_point().items()}
    stds = {name: np.full(np.shape(value), 0.1) for name, value in means.items()}
    means.update(mu_gene=np.asarray(mu), sigma_gene_log__=np.asarray(np.log(sigma)), gene_effect=gene_mean,
                 sigma_cond_log__=np.asarray(np.log(sigma_hat)))
    means[RAW_CELL_EFFECT] = estimate / variance / precision / per_raw_unit
    stds.update(gene_effect=gene_sd)
    stds[RAW_CELL_EFFECT] = 1.0 / np.sqrt(precision) / per_raw_unit
    collapsed = collapse_hyperparameters(model, _result(means, stds, backend))

    x = np.linspace(-15.0, 3.0, 180_001)  # log sigma_cond
    sigma_cond = np.exp(x)[:, None]
    log_marginal = (stats.norm.logpdf(estimate, 0.0, np.sqrt(sigma_cond**2 + variance)).sum(axis=1)
                    + stats.halfnorm.logpdf(sigma_cond[:, 0], scale=PRIOR_SIGMA_SD) + x)
    weights = np.exp(log_marginal - log_marginal.max())
    weights /= weights.sum()
    low, median, high = np.interp([(1 - INTERVAL_MASS) / 2, 0.5, (1 + INTERVAL_MASS) / 2], np.cumsum(weights), x)
    assert median - low > 1.2 * (high - median)  # the tail towards zero
    assert float(collapsed.means["sigma_cond_log__"]) == pytest.approx(median, abs=0.01)
    assert float(collapsed.stds["sigma_cond_log__"]) == pytest.approx((high - low) / (2 * 1.6449), rel=0.02)
    cell_precision = 1.0 / variance + 1.0 / sigma_cond**2
    raw_mean = estimate / variance / cell_precision / sigma_cond ** (1.0 - centring)
    raw_variance = 1.0 / cell_precision / sigma_cond ** (2 * (1.0 - centring))
    exact_mean = weights @ raw_mean
    exact_sd = np.sqrt(weights @ (raw_variance + raw_mean**2) - exact_mean**2)
    np.testing.assert_allclose(collapsed.means[RAW_CELL_EFFECT], exact_mean, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(collapsed.stds[RAW_CELL_EFFECT], exact_sd, rtol=2e-3)
