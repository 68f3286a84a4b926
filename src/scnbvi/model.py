"""The hierarchical Negative-Binomial model, defined once in PyMC and shared by both engines.

log mu_ig = gene_effect_g + cell_effect_i + offsets_ig + sum_k x_ik beta_gk, y_ig ~ NB(mu_ig, alpha),
gene_effect_g ~ N(mu_gene, sigma_gene), cell_effect_i ~ N(0, sigma_cond), alpha ~ HalfCauchy(2);
beta_gk ~ N(0, tau_k), tau_k ~ HalfNormal(1): per-gene covariate effects, shrunk per covariate;
with per-gene dispersion, log alpha_g ~ N(m, s), m ~ N(0, 2.5), s ~ HalfNormal(1).

The effects are centred: every gene is seen in thousands of cells and every cell in hundreds
of genes, so the data pin each effect and the posterior of a scale (``sigma_gene``) barely
correlates with the effects it governs. A mean-field q then keeps the scales' uncertainty;
in the non-centred form (effect = mu + sigma * z) each scale is tied to all its z's along a
flat direction, which q cannot represent: the fitted scales drifted with the optimiser and
their intervals came out about 10x too narrow. Only a cell with few counts in the fitted
genes is weakly informed; each cell effect is partially non-centred by how much its data
inform it (:func:`cell_effects`). The cell effects' prior mean is pinned at 0,
so the shared level is ``mu_gene`` alone (a second, free mean would only trade off with it).

The likelihood's terms, and their JAX forms, are in :mod:`scnbvi.likelihood`.
The observed counts enter through data containers that hold one minibatch at a time, so the
matrix itself never has to live inside the graph. Two minibatch layouts exist:
``cells`` (a block of whole cells with all genes, given by its non-zero entries) and
``entries`` (flattened (gene, cell, count) triples, the layout of the original notebook).
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt

from scnbvi.batches import MINIBATCH_MODES, empty_batch
from scnbvi.likelihood.pytensor_form import observed_entries, sparse_block_nb_logp

# Hyperpriors of the population-level parameters (log scale).
PRIOR_MU_SD = 1.0
PRIOR_SIGMA_SD = 1.0
PRIOR_ALPHA_BETA = 2.0
PRIOR_TAU_SD = 1.0
# Prior sd of each sample's effect (design.random): wide, so a sample's effect is its data's,
# not pulled towards the reference sample; the spread between samples is modelled afterwards.
PRIOR_SAMPLE_EFFECT_SD = 2.0
PRIOR_LOG_ALPHA_MEAN_SD = 2.5
PRIOR_LOG_ALPHA_SD_SD = 1.0
# The smallest spread of the cell effects assumed when weighting their parameterisation.
MIN_CELL_SPREAD = 0.05
# The free per-cell variable when the cell effects are partially non-centred (see cell_effects).
RAW_CELL_EFFECT = "cell_effect_raw"


def load_batch(model: pm.Model, batch: dict[str, np.ndarray]) -> None:
    """Put a minibatch into the model's data containers (what ``pm.fit`` trains on next)."""
    for name, values in batch.items():
        container = model[name]
        container.set_value(values.astype(container.dtype, copy=False))


def build_model(
    *,
    cell_log_offset: np.ndarray,
    gene_log_offset: np.ndarray,
    mode: str = "cells",
    batch_size: int = 128,
    gene_dispersion: bool = True,
    cell_names=None,
    gene_names=None,
    initvals: dict[str, np.ndarray] | None = None,
    jax_forms: bool = False,
    design: np.ndarray | None = None,
    coefficient_names=None,
    sample_coefficients: int = 0,
    cell_centring: np.ndarray | None = None,
) -> pm.Model:
    """Build the model for a data set of ``len(cell_log_offset)`` cells x ``len(gene_log_offset)`` genes.

    The likelihood is scaled by ``total_size`` so that a minibatch stands for the whole data set.
    ``jax_forms``: see :func:`scnbvi.likelihood.pytensor_form.sparse_block_nb_logp` (the ``jax`` engine sets it).
    ``design``: cells x coefficients covariates (see :mod:`scnbvi.design`), each with one
    effect per gene; its last ``sample_coefficients`` columns are sample indicators
    (:class:`scnbvi.design.SampleDesign`). ``cell_centring``: per cell, how centred its effect is parameterised
    (:func:`cell_centring_weights`; None: fully centred).
    """
    if mode not in MINIBATCH_MODES:
        raise ValueError(f"minibatch mode must be one of {MINIBATCH_MODES}, got {mode!r}")
    n_cells, n_genes = len(cell_log_offset), len(gene_log_offset)
    design = np.zeros((n_cells, 0)) if design is None else np.asarray(design, dtype=float)
    coords = {
        "cell": list(cell_names) if cell_names is not None else [f"cell{i}" for i in range(n_cells)],
        "gene": list(gene_names) if gene_names is not None else [f"gene{g}" for g in range(n_genes)],
    }
    if design.shape[1]:
        coords["coefficient"] = list(coefficient_names) if coefficient_names is not None else [
            f"x{k}" for k in range(design.shape[1])]
        if sample_coefficients:
            coords["shrunk_coefficient"] = coords["coefficient"][: design.shape[1] - sample_coefficients]
    batch = empty_batch(mode, batch_size)
    with pm.Model(coords=coords) as model:
        data = {name: pm.Data(name, value) for name, value in batch.items()}

        mu_gene = pm.Normal("mu_gene", 0.0, PRIOR_MU_SD)
        sigma_gene = pm.HalfNormal("sigma_gene", PRIOR_SIGMA_SD)
        gene_effect = pm.Normal("gene_effect", mu_gene, sigma_gene, dims="gene")
        cells = data["cell_index"]
        # The likelihood reads the per-cell variable only at ``cells``, so a step costs
        # O(batch), not O(n_cells), and an engine can treat it as a local parameter.
        cell_read = cell_effects(cells, cell_centring)
        alpha = gene_alpha() if gene_dispersion else pm.HalfCauchy("alpha", PRIOR_ALPHA_BETA)

        gene_log_rate = gene_effect + pt.as_tensor(np.asarray(gene_log_offset, dtype=float))
        cell_log_rate = cell_read + pt.as_tensor(np.asarray(cell_log_offset, dtype=float))[cells]
        # Centred covariates make each gene effect the gene's level at the data's average
        # covariates, nearly uncorrelated a posteriori with its covariate effects: a mean-field
        # q then keeps the effects' uncertainty instead of losing it to that correlation.
        centred = design - design.mean(axis=0)
        beta = covariate_effects(centred, sample_coefficients) if design.shape[1] else None
        covariates = pt.as_tensor(centred)[cells] if beta is not None else None
        if mode == "cells":
            block_logp = sparse_block_nb_logp(
                cell_log_rate, gene_log_rate, alpha, data["nz_row"], data["nz_gene"], data["nz_count"],
                jax_forms=jax_forms,
                covariates=covariates,
                beta=beta,
            )
            pm.Potential("y", block_logp * n_cells / cells.shape[0])
        else:
            genes = data["gene_index"]
            log_mu = cell_log_rate + gene_log_rate[genes]
            if beta is not None:
                log_mu = log_mu + pt.sum(covariates * beta[genes], axis=1)
            observed_entries("y", log_mu, alpha[genes] if gene_dispersion else alpha, data["counts"],
                             total_size=n_cells * n_genes)
    if initvals:
        initvals = dict(initvals)
        if cell_centring is not None and "cell_effect" in initvals:
            sigma = initvals.get("sigma_cond", 1.0)
            initvals[RAW_CELL_EFFECT] = initvals.pop("cell_effect") / sigma ** (1.0 - cell_centring)
        for name, value in initvals.items():
            model.set_initval(model[name], value)
    return model


def cell_effects(cells, centring: np.ndarray | None):
    """The cell effects read at ``cells``: ``cell_effect_i ~ N(0, sigma_cond)``, partially
    non-centred per cell when ``centring`` is given.

    The free variable is then ``raw_i ~ N(0, sigma_cond**w_i)`` with
    ``cell_effect_i = sigma_cond**(1 - w_i) * raw_i``: the same model, centred (w = 1) for a
    cell the data pin down and non-centred (w = 0) for one they barely inform. A weakly informed
    cell's centred effect is tied to ``sigma_cond`` (a funnel): a mean-field q then loses most of
    ``sigma_cond``'s uncertainty and NUTS mixes slowly; its non-centred effect is nearly
    independent of it.
    """
    sigma_cond = pm.HalfNormal("sigma_cond", PRIOR_SIGMA_SD)
    if centring is None:
        return pm.Normal("cell_effect", 0.0, sigma_cond, dims="cell")[cells]
    weights = pt.as_tensor(np.asarray(centring, dtype=float))
    raw = pm.Normal(RAW_CELL_EFFECT, 0.0, sigma_cond**weights, dims="cell")
    pm.Deterministic("cell_effect", sigma_cond ** (1.0 - weights) * raw, dims="cell")
    return raw[cells] * sigma_cond ** (1.0 - weights[cells])


def cell_centring_weights(counts, cell_log_offset) -> np.ndarray:
    """:func:`centring_weights` of a count matrix."""
    from scnbvi.cell_rows import InMemoryRows

    return centring_weights(InMemoryRows(counts).statistics(), cell_log_offset)


def centring_weights(statistics, cell_log_offset) -> np.ndarray:
    """Per cell, w_i = I_i s^2 / (1 + I_i s^2): the share of the cell effect's posterior
    precision that comes from its data, the weight that decouples the effect from
    ``sigma_cond`` in a Normal model (Gorinova, Moore & Hoffman 2020).

    ``I_i``, the Fisher information of a cell's log rate, is taken as its total count (Poisson).
    ``s^2``, the variance of the cell effects, is the covariance over cells of the log totals
    (over their offset) of the even and of the odd genes: the two halves share the cell effect
    but not their counting noise, which would dominate the variance of either. Any weights give
    the same model; they only change how well q and NUTS can follow it.
    """
    totals = statistics.cell_totals
    halves = [np.log(half + 0.5) - np.asarray(cell_log_offset, dtype=float) for half in statistics.cell_half_totals]
    n_genes = len(statistics.gene_totals)
    shared = np.cov(*halves)[0, 1] if n_genes > 1 and len(totals) > 1 else 0.0
    spread = max(shared, MIN_CELL_SPREAD**2)
    return totals * spread / (1.0 + totals * spread)


def gene_alpha():
    """Per-gene dispersion, shrunk towards a common level learned from all genes."""
    log_alpha_mean = pm.Normal("log_alpha_mean", 0.0, PRIOR_LOG_ALPHA_MEAN_SD)
    log_alpha_sd = pm.HalfNormal("log_alpha_sd", PRIOR_LOG_ALPHA_SD_SD)
    log_alpha = pm.Normal("log_alpha", log_alpha_mean, log_alpha_sd, dims="gene")
    return pm.Deterministic("alpha", pt.exp(log_alpha), dims="gene")


def covariate_effects(centred_design: np.ndarray, sample_coefficients: int = 0):
    """Per-gene effects of each covariate (genes x coefficients), beta_gk ~ N(0, tau_k); the
    last ``sample_coefficients`` (samples' effects) have the fixed prior N(0, PRIOR_SAMPLE_EFFECT_SD)
    instead: shrunk towards the reference sample, they would carry less of a condition that
    differs between samples, and :mod:`scnbvi.samples` models their spread.

    The free variable is ``gamma = beta @ R.T``, where ``R`` comes from the QR decomposition of
    the centred design: in these coordinates the covariates are orthonormal, so the
    likelihood barely correlates a gene's coefficients, and a mean-field q keeps each
    coefficient's full uncertainty (with indicators of several levels of one column it would
    lose it to their correlation). The map is linear, so the density of beta is the prior
    itself, added as a potential.
    """
    _, upper = np.linalg.qr(centred_design / np.sqrt(len(centred_design)))
    shrunk = centred_design.shape[1] - sample_coefficients
    scale = pt.as_tensor(np.full(sample_coefficients, PRIOR_SAMPLE_EFFECT_SD))
    if shrunk:
        tau = pm.HalfNormal("tau", PRIOR_TAU_SD, dims="shrunk_coefficient" if sample_coefficients else "coefficient")
        scale = pt.concatenate([tau, scale])
    gamma = pm.Flat("gamma", dims=("gene", "coefficient"))
    beta = pm.Deterministic("beta", pt.dot(gamma, pt.as_tensor(np.linalg.inv(upper)).T), dims=("gene", "coefficient"))
    pm.Potential("beta_prior", pt.sum(pm.logp(pm.Normal.dist(0.0, scale), beta)))
    return beta

