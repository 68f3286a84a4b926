"""Counts simulated from the model itself with known parameters, to check recovery end to end."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scnbvi.design import coefficient_name
from scnbvi.likelihood.sampling import sample_counts


@dataclass(frozen=True)
class SimulationTruth:
    """True population parameters; per-gene and per-cell effects are drawn from them."""

    mu_gene: float = 0.0
    sigma_gene: float = 1.0
    mu_cond: float = 0.0
    sigma_cond: float = 0.3
    alpha: float = 2.0
    log_alpha_sd: float = 0.0
    depth_ref: float = 1e5
    length_ref: float = 2000.0
    condition_effect_sd: float = 0.0
    batch_effect_sd: float = 0.0
    # Samples (donors): with donors > 0 the condition is given per donor (the first half
    # control), and each donor shifts each gene by N(0, donor_effect_sd).
    donors: int = 0
    donor_effect_sd: float = 0.0


# Simulated covariates: obs column -> levels, the first is the reference (effect zero).
SIMULATED_FACTORS = {"condition": ("control", "treated"), "batch": ("b1", "b2", "b3")}


def simulate_counts(n_cells: int, n_genes: int, seed: int, truth: SimulationTruth = SimulationTruth()) -> ad.AnnData:
    """Draw a cells x genes count matrix from the model.

    Depth goes to ``obs['depth']`` and gene length to ``var['length']``; the true effects go
    to ``obs['true_cell_effect']``, ``var['true_gene_effect']`` and the truth to ``uns``.
    Each gene's dispersion is ``alpha`` times a log-normal factor with sd ``log_alpha_sd``
    (none by default), stored as ``var['true_alpha']``.
    Every cell gets a ``condition`` and a ``batch`` (uniformly at random); each non-reference
    level has a per-gene effect drawn from N(0, sd) with the truth's ``*_effect_sd`` (zero by
    default), stored as ``var['true_beta_<column>[<level>]']``. With ``truth.donors``, cells
    also get a ``donor`` whose condition they share (see :class:`SimulationTruth`).
    """
    rng = np.random.default_rng(seed)
    gene_effect = truth.mu_gene + truth.sigma_gene * rng.standard_normal(n_genes)
    cell_effect = truth.mu_cond + truth.sigma_cond * rng.standard_normal(n_cells)
    depth = rng.lognormal(np.log(truth.depth_ref), 0.5, n_cells)
    length = rng.uniform(1000, 3000, n_genes)
    log_mu = (
        (cell_effect + np.log(depth / truth.depth_ref))[:, None]
        + (gene_effect + np.log(length / truth.length_ref))[None, :]
    )
    covariate_rng = np.random.default_rng([seed, 2])  # a stream of its own: the rest stays as without covariates
    factors = {column: covariate_rng.integers(0, len(levels), n_cells) for column, levels in SIMULATED_FACTORS.items()}
    obs_extra = {}
    if truth.donors:
        donor_rng = np.random.default_rng([seed, 4])
        donor = donor_rng.integers(0, truth.donors, n_cells)
        factors["condition"] = (donor >= truth.donors // 2).astype(np.int64)
        log_mu += truth.donor_effect_sd * donor_rng.standard_normal((truth.donors, n_genes))[donor]
        obs_extra["donor"] = pd.Categorical([f"donor{d}" for d in donor])
    effect_sd = {"condition": truth.condition_effect_sd, "batch": truth.batch_effect_sd}
    true_beta = {}
    for column, levels in SIMULATED_FACTORS.items():
        for code, level in enumerate(levels[1:], start=1):
            beta = effect_sd[column] * covariate_rng.standard_normal(n_genes)
            log_mu += (factors[column] == code)[:, None] * beta[None, :]
            true_beta[f"true_beta_{coefficient_name(column, level)}"] = beta
    mu = np.exp(log_mu)
    alpha = truth.alpha * np.exp(truth.log_alpha_sd * np.random.default_rng([seed, 3]).standard_normal(n_genes))
    counts = sample_counts(rng, mu, alpha)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.int32)),
        obs=pd.DataFrame(
            {
                "depth": depth,
                "true_cell_effect": cell_effect,
                **{column: pd.Categorical(np.asarray(levels)[factors[column]], categories=levels)
                   for column, levels in SIMULATED_FACTORS.items()},
                **obs_extra,
            },
            index=[f"cell{i:06d}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(
            {"length": length, "true_gene_effect": gene_effect, "true_alpha": alpha, **true_beta},
            index=[f"gene{g:05d}" for g in range(n_genes)],
        ),
    )
    adata.uns["truth"] = {**asdict(truth), "seed": seed}
    return adata
