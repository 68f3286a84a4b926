"""Samples as random effects: a contrast between conditions that vary between samples (donors,
animals, wells), estimated from the samples rather than from their cells.

The fit gives each gene one effect per sample (``log mu_ig`` gains ``v_g,s(i)``), so within-
sample covariates and every cell stay in the cell-level model. A sample-level covariate enters
through the samples' effects: ``v_gs = a_g + z_s gamma_g + u_gs`` with ``u_gs ~ N(0, sigma_g^2)``.
Given the fitted ``v_gs`` (thousands of cells pin each of them), this second level is a Gaussian
linear model per gene, integrated exactly: ``gamma_g`` has a t posterior whose width comes from
the spread between samples. ``sigma_g`` is shrunk across genes as limma's empirical Bayes does
(Smyth 2004): a scaled inverse chi-square prior fitted to all genes' residual variances, so that
a handful of samples still gives each gene a stable scale. The prior's scale follows how precisely
the fit measured each gene's sample effects (their posterior variance), which separates counting
noise from the spread between samples better than mean expression does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special


@dataclass(frozen=True)
class SampleContrast:
    """Per gene: the contrast's estimate, its standard error and degrees of freedom (the
    estimate's error over ``se`` is a t on ``df``: adaptive shrinkage's likelihood), and the
    gene's sample sd (the moderated sigma_g); ``prior_sd`` (the median gene's) and
    ``prior_df`` describe the scale shared across genes."""

    estimate: np.ndarray
    se: np.ndarray
    df: float
    sample_sd: np.ndarray
    prior_sd: float
    prior_df: float


def trigamma_inverse(values: np.ndarray | float) -> np.ndarray:
    """x with trigamma(x) = values, by Newton's method from limma's starting point."""
    y = np.asarray(values, dtype=np.float64)
    x = 0.5 + 1.0 / y
    for _ in range(50):
        tri = special.polygamma(1, x)
        step = tri * (1 - tri / y) / special.polygamma(2, x)
        x = x + step
        if np.all(-step / x < 1e-8):
            break
    return x


def fit_variance_prior(variances: np.ndarray, df: float, trend: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """limma's fitFDist: (prior variance s0^2 per gene, prior df d0) from genes' residual
    variances on df degrees of freedom, by matching the moments of their logs. With ``trend``
    (e.g. the log measurement variance of each gene's sample effects) s0^2 follows it as a cubic,
    as limma-trend does with expression: poorly measured genes vary more between samples from
    counting noise alone. d0 is infinite when the variances are no more spread than sampling
    explains."""
    variances = np.asarray(variances, dtype=np.float64)
    usable = np.isfinite(variances) & (variances > 0)
    e = np.log(np.where(usable, variances, 1.0)) - special.digamma(df / 2) + np.log(df / 2)
    if trend is None or np.ptp(trend[usable]) == 0:
        fitted, parameters = np.full(len(variances), e[usable].mean()), 1
    else:
        x = (trend - trend[usable].mean()) / max(trend[usable].std(), 1e-12)
        coefficients = np.polynomial.polynomial.polyfit(x[usable], e[usable], 3)
        fitted, parameters = np.polynomial.polynomial.polyval(x, coefficients), 4
    residual = e[usable] - fitted[usable]
    spread = np.sum(residual**2) / (usable.sum() - parameters) - special.polygamma(1, df / 2)
    if spread <= 0:
        return np.exp(fitted), np.inf
    prior_df = float(2 * trigamma_inverse(spread))
    return np.exp(fitted + special.digamma(prior_df / 2) - np.log(prior_df / 2)), prior_df


def sample_contrast(effects: np.ndarray, sample_design: np.ndarray, weights: np.ndarray,
                    trend: np.ndarray | None = None) -> SampleContrast:
    """The contrast ``weights . gamma_g`` for every gene.

    ``effects``: genes x samples, each sample's fitted effect (any per-gene constant may be
    added: the intercept absorbs it); ``sample_design``: samples x coefficients, without the
    intercept; ``weights``: one per coefficient; ``trend``: per gene, what the variance prior
    follows (e.g. the log of the measurement variance of its sample effects; None: one prior for
    all genes)."""
    n_genes, n_samples = effects.shape
    design = np.column_stack([np.ones(n_samples), sample_design])
    residual_df = n_samples - np.linalg.matrix_rank(design)
    if residual_df < 1:
        raise ValueError(f"{n_samples} samples leave no residual degrees of freedom for "
                         f"{design.shape[1]} sample-level coefficients")
    unscaled = np.linalg.pinv(design.T @ design)
    coefficients = effects @ design @ unscaled  # genes x coefficients (least squares, all genes at once)
    residuals = effects - coefficients @ design.T
    variances = np.sum(residuals**2, axis=1) / residual_df
    prior_variance, prior_df = fit_variance_prior(variances, residual_df, trend)
    if np.isinf(prior_df):
        moderated, total_df = np.full(n_genes, prior_variance), np.inf
    else:
        moderated = (prior_df * prior_variance + residual_df * variances) / (prior_df + residual_df)
        total_df = prior_df + residual_df
    full_weights = np.concatenate([[0.0], weights])
    estimate = coefficients @ full_weights
    se = np.sqrt(moderated * (full_weights @ unscaled @ full_weights))
    return SampleContrast(estimate, se, float(min(total_df, 1e6)), np.sqrt(moderated),
                          float(np.sqrt(np.median(prior_variance))), float(prior_df))
