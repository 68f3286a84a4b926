"""The hyperparameters' collapsed posterior against the exact normal-normal marginal."""

from __future__ import annotations

import numpy as np
from scipy import stats

from scnbvi.inference import FitResult, InferenceSettings
from scnbvi.inference.hyperparameters import collapse_hyperparameters
from scnbvi.model import build_model

N_CELLS, N_GENES = 30, 60


def _result(means, stds) -> FitResult:
    return FitResult(means, stds, losses=np.ones(3), checks=[], epochs=1.0, converged=True, fit_seconds=0.0,
                     compile_seconds=0.0, engine="jax", backend="c", settings=InferenceSettings(), decays=0,
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


def test_collapsed_sds_are_the_exact_marginal_curvature_when_effects_are_gaussian():
    """With a Gaussian likelihood per effect, integrating the effects out is exact: the sds must
    come from the curvature of the normal-normal marginal at q's means, which stay as they are."""
    estimate, variance, (mu, sigma), posterior_mean, posterior_sd = _gaussian_gene_effects()
    model = build_model(cell_log_offset=np.zeros(N_CELLS), gene_log_offset=np.zeros(N_GENES), gene_dispersion=False,
                        cell_centring=np.linspace(0.2, 1.0, N_CELLS))
    means = {name: np.asarray(value, dtype=float) for name, value in model.initial_point().items()}
    stds = {name: np.full(np.shape(value), 0.1) for name, value in means.items()}
    means.update(mu_gene=np.asarray(mu), sigma_gene_log__=np.asarray(np.log(sigma)), gene_effect=posterior_mean)
    stds["gene_effect"] = posterior_sd
    collapsed = collapse_hyperparameters(model, _result(means, stds))

    at = np.array([mu, np.log(sigma)])
    step, hessian = 1e-4, np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            shifts = [np.eye(2)[i] * step * a + np.eye(2)[j] * step * b for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
            f = [_exact_log_posterior(at + d, estimate, variance) for d in shifts]
            hessian[i, j] = (f[0] - f[1] - f[2] + f[3]) / (4 * step**2)
    exact_sd = np.sqrt(np.diag(np.linalg.inv(-hessian)))
    np.testing.assert_allclose([collapsed.stds["mu_gene"], collapsed.stds["sigma_gene_log__"]], exact_sd, rtol=1e-4)
    # Means, the effects and the parameters outside a hierarchy keep their q.
    assert all(np.array_equal(collapsed.means[name], means[name]) for name in means)
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
