"""ADVI checked against NUTS on a subset: the same model fitted both ways, compared per quantity.

Mean-field ADVI is fast but approximate: it can shift means and understate sds where the
posterior is correlated. On a seeded subset of cells and expressed genes, small enough for
NUTS, both fits run on the same data with the same model, and each quantity group is compared
by the correlation of the posterior means, the mean difference in NUTS sds, the sd ratio and the
NUTS posterior mass inside ADVI's central interval. Gene and cell effects are compared
centred, per draw: their differences are what the data inform, while their common level trades
off with ``mu_gene`` and the cell effects' prior.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import arviz as az
import numpy as np
import pandas as pd
import pymc as pm
import scipy.sparse as sp
import xarray as xr

from scnbvi.batches import cell_block
from scnbvi.cell_rows import as_rows
from scnbvi.design import Design
from scnbvi.errors import InputError
from scnbvi.inference import InferenceSettings, fit
from scnbvi.inference.settings import settings_from_section
from scnbvi.model import build_model, cell_centring_weights, load_batch
from scnbvi.posterior import draw_posterior, posterior_variables

log = logging.getLogger("scnbvi")

# A gene detected in fewer of the subset's cells leaves its dispersion to the prior: a funnel
# that NUTS explores slowly and that says little about ADVI on the genes the data inform.
MIN_DETECTED_FRACTION = 0.05
INTERVAL_MASS = 0.9
# Global scalars compared one by one (those absent from the posterior are skipped).
SCALARS = ("sigma_gene", "sigma_cond", "mu_gene", "log_alpha_mean", "log_alpha_sd")
# Draws of q the check compares (at least; more if the fit's ``draws`` asks for more). q's own
# Monte-Carlo error must stay below NUTS's (bulk ESS in the thousands): with a fit's 1,000
# draws, it alone lowered the correlation of the cell effects' means with NUTS's from 0.9995
# (q's exact means) to 0.997 on real droplet cells, whose means differ by less than their sds.
ADVI_DRAWS = 10_000
# The groups that are centred per draw.
CENTRED = {"gene_effect": "gene_effect (centred)", "cell_effect": "cell_effect (centred)"}


@dataclass(frozen=True)
class NutsSettings:
    """The subset and the NUTS run; mirrors ``check.nuts`` of the workflow config (same defaults)."""

    cells: int = 300
    genes: int = 80
    chains: int = 4
    draws: int = 4000
    tune: int = 2000
    seed: int = 1

    @classmethod
    def from_config(cls, section: dict) -> NutsSettings:
        return settings_from_section(cls, section)


@dataclass(frozen=True)
class Subset:
    """The subset's counts and the fixed inputs of the model for its cells and genes."""

    counts: sp.csr_matrix
    cell_log_offset: np.ndarray
    gene_log_offset: np.ndarray
    cell_names: list
    gene_names: list
    design: Design | None


def select_subset(counts, n_cells: int, n_genes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (in file order) of a seeded random choice of cells, then of genes among those
    detected in at least ``MIN_DETECTED_FRACTION`` of the chosen cells. ``counts``: a matrix, or a
    store of rows that reads only the chosen cells (:mod:`scnbvi.cell_rows`)."""
    rows = as_rows(counts)
    rng = np.random.default_rng([seed, 21])
    cells = np.sort(rng.choice(rows.shape[0], min(n_cells, rows.shape[0]), replace=False))
    detected = np.asarray((rows.rows(cells) > 0).sum(axis=0)).ravel()
    expressed = np.flatnonzero(detected >= max(1, np.ceil(MIN_DETECTED_FRACTION * len(cells))))
    if len(expressed) < 2:
        raise InputError("config", "check.nuts", f"the {len(cells)} chosen cells detect {len(expressed)} genes in at "
                         f"least {MIN_DETECTED_FRACTION:.0%} of them, too few to compare gene effects",
                         "raise check.nuts.cells")
    genes = np.sort(rng.choice(expressed, min(n_genes, len(expressed)), replace=False))
    return cells, genes


def make_subset(counts, cell_log_offset, gene_log_offset, cell_names, gene_names, design: Design | None,
                settings: NutsSettings) -> Subset:
    """The subset of :func:`select_subset` with its offsets, names and design rows."""
    cells, genes = select_subset(counts, settings.cells, settings.genes, settings.seed)
    if design is not None and design.n_coefficients:
        matrix = design.matrix[cells]
        centred = matrix - matrix.mean(axis=0)
        if np.linalg.matrix_rank(centred) < design.n_coefficients:
            raise InputError("config", "check.nuts.cells", f"in the {len(cells)} chosen cells the design "
                             f"{list(design.names)} is not of full rank (a level is missing or confounded)",
                             "raise check.nuts.cells or change check.nuts.seed")
        design = replace(design, matrix=matrix)
    else:
        design = None
    return Subset(
        counts=as_rows(counts).rows(cells)[:, genes],
        cell_log_offset=np.asarray(cell_log_offset, dtype=float)[cells],
        gene_log_offset=np.asarray(gene_log_offset, dtype=float)[genes],
        cell_names=[cell_names[i] for i in cells],
        gene_names=[gene_names[g] for g in genes],
        design=design,
    )


def nuts_model(subset: Subset, gene_dispersion: bool) -> pm.Model:
    """The model of the whole subset in one block of all its cells, so the likelihood's
    minibatch scale is 1 and the log density is the full-data one."""
    n_cells = subset.counts.shape[0]
    model = build_model(
        cell_log_offset=subset.cell_log_offset,
        gene_log_offset=subset.gene_log_offset,
        mode="cells",
        batch_size=n_cells,
        gene_dispersion=gene_dispersion,
        cell_names=subset.cell_names,
        gene_names=subset.gene_names,
        design=None if subset.design is None else subset.design.matrix,
        coefficient_names=None if subset.design is None else subset.design.names,
        sample_coefficients=0 if subset.design is None else subset.design.n_sample_coefficients,
        cell_centring=cell_centring_weights(subset.counts, subset.cell_log_offset),
    )
    load_batch(model, cell_block(subset.counts, np.arange(n_cells)))
    return model


def sample_nuts(model: pm.Model, settings: NutsSettings, cores: int) -> az.InferenceData:
    """PyMC's NUTS, with the sampling statistics (divergences) kept.

    The mass matrix is adapted from gradients as well as draws (``adapt_diag_grad``): on 300
    cells x 80 genes it halves the leapfrog steps per draw (17 against 31) and leaves no
    divergences where the draws alone left some.
    """
    with model:
        return pm.sample(
            draws=settings.draws, tune=settings.tune, chains=settings.chains, cores=min(cores, settings.chains),
            init="jitter+adapt_diag_grad", random_seed=settings.seed, var_names=posterior_variables(model),
            progressbar=False, compute_convergence_checks=False,
        )


def advi_posterior(subset: Subset, settings: InferenceSettings, backend: str, gene_dispersion: bool) -> az.InferenceData:
    """The workflow's ADVI fit on the subset, and at least ``ADVI_DRAWS`` draws of it."""
    model, result = fit(subset.counts, subset.cell_log_offset, subset.gene_log_offset, settings, backend=backend,
                        gene_dispersion=gene_dispersion, cell_names=subset.cell_names, gene_names=subset.gene_names,
                        design=subset.design)
    return draw_posterior(model, result, max(settings.draws, ADVI_DRAWS), settings.seed)


@dataclass(frozen=True)
class Quantity:
    """A group of compared quantities: draws x elements and the elements' names."""

    draws: np.ndarray
    elements: list[str]


def quantity_groups(posterior: xr.Dataset) -> dict[str, Quantity]:
    """The compared quantities of a posterior, chains and draws stacked; absent ones skipped.

    Gene and cell effects are centred per draw; a per-gene alpha is compared as log alpha.
    """
    def draws(name: str, *dims: str) -> np.ndarray:
        variable = posterior[name].transpose("chain", "draw", *dims)
        return np.asarray(variable.values, dtype=np.float64).reshape(-1, *variable.shape[2:])

    def labels(template: str, dim: str) -> list[str]:
        return [template.format(value) for value in posterior[dim].values]

    groups = {}
    for name, label in CENTRED.items():
        if name in posterior:
            dim = posterior[name].dims[-1]
            values = draws(name, dim)
            groups[label] = Quantity(values - values.mean(axis=1, keepdims=True), labels(name + "[{}]", dim))
    if "alpha" in posterior:
        if "gene" in posterior["alpha"].dims:
            groups["log alpha"] = Quantity(np.log(draws("alpha", "gene")), labels("log alpha[{}]", "gene"))
        else:
            groups["alpha"] = Quantity(draws("alpha")[:, None], ["alpha"])
    for name in SCALARS:
        if name in posterior:
            groups[name] = Quantity(draws(name)[:, None], [name])
    coefficients = posterior["coefficient"].values if "coefficient" in posterior.coords else []
    # tau's dim is "coefficient", or "shrunk_coefficient" when samples' effects have no tau.
    tau_dim = posterior["tau"].dims[-1] if "tau" in posterior else None
    shrunk = list(posterior[tau_dim].values) if tau_dim else []
    for k, coefficient in enumerate(coefficients):
        if coefficient in shrunk:
            groups[f"tau[{coefficient}]"] = Quantity(draws("tau", tau_dim)[:, [shrunk.index(coefficient)]],
                                                     [f"tau[{coefficient}]"])
        if "beta" in posterior:
            groups[f"beta[{coefficient}]"] = Quantity(draws("beta", "gene", "coefficient")[:, :, k],
                                                      labels(f"beta[{{}},{coefficient}]", "gene"))
    return groups


def compare_draws(nuts: np.ndarray, advi: np.ndarray, mass: float = INTERVAL_MASS) -> dict:
    """ADVI's draws against NUTS's (each draws x elements) for one group.

    ``correlation`` of the posterior means over elements (NaN for a single element),
    ``mean_difference_in_sd`` the median |mean difference| / NUTS sd, ``sd_ratio`` the median
    ADVI sd / NUTS sd, ``nuts_mass_in_advi_interval`` the NUTS draws' average share inside
    ADVI's central ``mass`` interval, and ``missed`` the elements whose ADVI interval misses
    the NUTS mean.
    """
    nuts_mean, advi_mean = nuts.mean(axis=0), advi.mean(axis=0)
    nuts_sd, advi_sd = nuts.std(axis=0, ddof=1), advi.std(axis=0, ddof=1)
    low, high = np.quantile(advi, [(1 - mass) / 2, (1 + mass) / 2], axis=0)
    inside = ((nuts >= low) & (nuts <= high)).mean(axis=0)
    several = nuts.shape[1] > 1 and np.ptp(nuts_mean) > 0 and np.ptp(advi_mean) > 0
    return {
        "correlation": float(np.corrcoef(nuts_mean, advi_mean)[0, 1]) if several else float("nan"),
        "mean_difference_in_sd": float(np.median(np.abs(advi_mean - nuts_mean) / nuts_sd)),
        "sd_ratio": float(np.median(advi_sd / nuts_sd)),
        "nuts_mass_in_advi_interval": float(inside.mean()),
        "missed": (nuts_mean < low) | (nuts_mean > high),
    }


def comparison_table(nuts: az.InferenceData, advi: az.InferenceData) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """One row per quantity group, and the elements whose ADVI interval misses the NUTS mean
    (by group).

    ``flagged``: a group with at least one such element. ``rhat_max`` and
    ``ess_bulk_min`` are the NUTS run's over the group's elements.
    """
    nuts_groups, advi_groups = quantity_groups(nuts.posterior), quantity_groups(advi.posterior)
    chains = nuts.posterior.sizes["chain"]
    rows, missed = [], {}
    for group, reference in nuts_groups.items():
        if group not in advi_groups:
            continue
        metrics = compare_draws(reference.draws, advi_groups[group].draws)
        misses = metrics.pop("missed")
        names = [element for element, miss in zip(reference.elements, misses) if miss]
        if names:
            missed[group] = names
        # R-hat and ESS of the quantities as compared: centred effects are not the raw ones.
        per_chain = xr.Dataset({"x": (("chain", "draw", "element"),
                                      reference.draws.reshape(chains, -1, len(reference.elements)))})
        rows.append({
            "quantity": group,
            "elements": len(reference.elements),
            **metrics,
            "missed": len(names),
            "flagged": bool(names),
            "rhat_max": float(az.rhat(per_chain)["x"].max()),
            "ess_bulk_min": float(az.ess(per_chain, method="bulk")["x"].min()),
        })
    return pd.DataFrame(rows).set_index("quantity"), missed


def nuts_diagnostics(nuts: az.InferenceData, table: pd.DataFrame) -> dict:
    """The NUTS run's convergence in a few numbers: worst r-hat, smallest bulk ESS, divergences."""
    return {
        "rhat_max": float(table["rhat_max"].max()),
        "ess_bulk_min": float(table["ess_bulk_min"].min()),
        "divergences": int(nuts.sample_stats["diverging"].sum()),
        "chains": int(nuts.posterior.sizes["chain"]),
        "draws": int(nuts.posterior.sizes["draw"]),
    }


def check_nuts(counts, cell_log_offset, gene_log_offset, cell_names, gene_names, design: Design | None, *,
               nuts: NutsSettings, inference: InferenceSettings, backend: str = "c", gene_dispersion: bool = True,
               cores: int = 2) -> tuple[pd.DataFrame, dict]:
    """Fit the subset with NUTS and with ADVI; returns the comparison table and a record of the
    run (NUTS diagnostics, the subset's size, the times, the elements that missed)."""
    subset = make_subset(counts, cell_log_offset, gene_log_offset, cell_names, gene_names, design, nuts)
    n_cells, n_genes = subset.counts.shape
    log.info("NUTS check on %d cells x %d genes: %d chains x (%d tune + %d draws)", n_cells, n_genes, nuts.chains,
             nuts.tune, nuts.draws)
    start = time.perf_counter()
    nuts_idata = sample_nuts(nuts_model(subset, gene_dispersion), nuts, cores)
    nuts_seconds = time.perf_counter() - start
    start = time.perf_counter()
    advi_idata = advi_posterior(subset, inference, backend, gene_dispersion)
    advi_seconds = time.perf_counter() - start
    table, missed = comparison_table(nuts_idata, advi_idata)
    record = {
        "cells": n_cells,
        "genes": n_genes,
        **nuts_diagnostics(nuts_idata, table),
        "tune": nuts.tune,
        "advi_draws": advi_idata.posterior.sizes["chain"] * advi_idata.posterior.sizes["draw"],
        "nuts_seconds": nuts_seconds,
        "advi_seconds": advi_seconds,
        "flagged": sorted(missed),
        "missed": missed,
    }
    log.info("NUTS: max r-hat %.3f, min bulk ESS %.0f, %d divergences, %.1f s; ADVI %.1f s",
             record["rhat_max"], record["ess_bulk_min"], record["divergences"], nuts_seconds, advi_seconds)
    for group, names in missed.items():
        log.warning("flagged %s: ADVI's %.0f %% interval misses the NUTS mean for %d of %d elements (%s)", group,
                    100 * INTERVAL_MASS, len(names), table.loc[group, "elements"], ", ".join(names[:5]) +
                    (", ..." if len(names) > 5 else ""))
    return table, record
