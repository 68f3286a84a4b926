"""Posterior predictive checks: counts replicated from the posterior draws, compared with the
observed counts per gene (zero fraction, mean, variance) and per cell (library size).

A model that fits leaves each observed statistic inside the band of its replicates for most
genes; a dispersion that is too small or too large, or a missing covariate, shows up as many
genes outside the band, most visibly in the zero fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import arviz as az
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scnbvi.design import Design
from scnbvi.errors import InputError
from scnbvi.likelihood.sampling import sample_counts

BAND = 0.9  # mass of the band of replicated statistics
BLOCK_ENTRIES = 2_000_000  # cells x genes replicated at once: memory stays bounded at any size
GENE_STATISTICS = ("zero_fraction", "mean", "variance")
HISTOGRAM_BINS = 30


@dataclass(frozen=True)
class PosteriorDraws:
    """What the likelihood reads, per draw: ``gene_effect`` (draws x genes), ``cell_effect``
    (draws x cells), ``alpha`` (draws, or draws x genes) and ``beta`` (draws x genes x
    coefficients, named by ``coefficients``; None without a design)."""

    gene_effect: np.ndarray
    cell_effect: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray | None = None
    coefficients: tuple[str, ...] = ()

    @property
    def n_draws(self) -> int:
        return len(self.gene_effect)


@dataclass(frozen=True)
class PredictiveCheck:
    """Per-gene and per-cell comparisons (see :func:`compare`), the replicated library sizes
    (draws x cells) and the verdict."""

    genes: pd.DataFrame
    cells: pd.DataFrame
    library_sizes: np.ndarray
    verdict: dict


def _choice(n: int, size: int, seed: int, stream: int) -> np.ndarray:
    """A seeded choice of ``size`` of ``n`` positions, in increasing order (all when size >= n)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, stream]).choice(n, size, replace=False))


def select_cells(trace_cells, max_cells: int, seed: int) -> list[str]:
    """The cells to check: a seeded choice of at most ``max_cells`` of those whose draws the
    trace keeps, in file order."""
    trace_cells = [str(cell) for cell in trace_cells]
    return [trace_cells[i] for i in _choice(len(trace_cells), max_cells, seed, 1)]


def cell_positions(cells, count_cells, source="trace.nc") -> np.ndarray:
    """Rows of the count matrix holding ``cells``; a cell the counts lack means the trace is
    from other data."""
    positions = pd.Index([str(name) for name in count_cells]).get_indexer([str(cell) for cell in cells])
    if (positions < 0).any():
        missing = [cell for cell, position in zip(cells, positions) if position < 0]
        raise InputError(source, "cell", f"{len(missing)} cells of the trace are not in the counts "
                         f"(first: {missing[0]!r})", "rerun the fit")
    return positions


def posterior_draws(idata: az.InferenceData, cells, max_draws: int, seed: int) -> PosteriorDraws:
    """The draws the likelihood reads, for ``cells``: a seeded choice of at most ``max_draws``
    draws over all chains, as float64."""
    posterior = idata.posterior.stack(sample=("chain", "draw"))
    keep = _choice(posterior.sizes["sample"], max_draws, seed, 2)
    posterior = posterior.isel(sample=keep).sel(cell=list(cells))

    def values(name, *dims):
        return posterior[name].transpose("sample", *dims).values.astype(np.float64)

    beta = values("beta", "gene", "coefficient") if "beta" in posterior else None
    return PosteriorDraws(
        gene_effect=values("gene_effect", "gene"),
        cell_effect=values("cell_effect", "cell"),
        alpha=values("alpha", *(dim for dim in posterior["alpha"].dims if dim != "sample")),
        beta=beta,
        coefficients=tuple(str(name) for name in posterior["coefficient"].values) if beta is not None else (),
    )


def centred_covariates(design: Design, coefficients) -> np.ndarray:
    """The design's columns in the order of the trace's coefficients, centred over every fitted
    cell as the model centres them (cells x coefficients)."""
    missing = [name for name in coefficients if name not in design.names]
    if missing:
        raise InputError("design.json", "names", f"coefficients {missing} of the trace are not in the design",
                         "rerun the fit")
    matrix = design.matrix[:, [design.names.index(name) for name in coefficients]]
    return matrix - matrix.mean(axis=0)


def replicate(
    draws: PosteriorDraws,
    cell_log_offset: np.ndarray,
    gene_log_offset: np.ndarray,
    covariates: np.ndarray | None,
    seed: int,
    block_entries: int = BLOCK_ENTRIES,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One replicated data set per draw, reduced to its per-gene statistics (each draws x
    genes) and its library sizes (draws x cells).

    log mu_ig = gene_effect_g + cell_effect_i + cell_log_offset_i + gene_log_offset_g
    + covariates_i . beta_g, with ``covariates`` centred as the model centres them. Cells are
    replicated in blocks of about ``block_entries`` counts; one generator draws them in order,
    so the numbers do not depend on the block size.
    """
    n_draws, n_cells = draws.cell_effect.shape
    n_genes = len(gene_log_offset)
    rng = np.random.default_rng(seed)
    block = max(1, block_entries // n_genes)
    zeros = np.zeros((n_draws, n_genes))
    sums = np.zeros((n_draws, n_genes))
    squares = np.zeros((n_draws, n_genes))
    library_sizes = np.zeros((n_draws, n_cells))
    for d in range(n_draws):
        gene_rate = draws.gene_effect[d] + gene_log_offset
        cell_rate = draws.cell_effect[d] + cell_log_offset
        for start in range(0, n_cells, block):
            rows = slice(start, start + block)
            log_mu = cell_rate[rows, None] + gene_rate[None, :]
            if draws.beta is not None:
                log_mu = log_mu + covariates[rows] @ draws.beta[d].T
            counts = sample_counts(rng, np.exp(log_mu), draws.alpha[d]).astype(np.float64)
            zeros[d] += (counts == 0).sum(axis=0)
            sums[d] += counts.sum(axis=0)
            squares[d] += (counts**2).sum(axis=0)
            library_sizes[d, rows] = counts.sum(axis=1)
    return _statistics(zeros, sums, squares, n_cells), library_sizes


def gene_statistics(counts) -> dict[str, np.ndarray]:
    """Zero fraction, mean and variance (over cells, ddof 0) of each gene of a cells x genes matrix."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    zeros = counts.shape[0] - np.asarray((counts != 0).sum(axis=0)).ravel()
    sums = np.asarray(counts.sum(axis=0)).ravel()
    squares = np.asarray(counts.multiply(counts).sum(axis=0)).ravel()
    return _statistics(zeros, sums, squares, counts.shape[0])


def _statistics(zeros, sums, squares, n_cells) -> dict[str, np.ndarray]:
    # Sums of counts are exact in float64, so this form of the variance loses nothing.
    mean = sums / n_cells
    return {"zero_fraction": zeros / n_cells, "mean": mean, "variance": np.maximum(squares / n_cells - mean**2, 0.0)}


def compare(observed: np.ndarray, replicated: np.ndarray, band: float = BAND) -> pd.DataFrame:
    """Observed against replicated (draws x items): the replicates' mean (``predicted``), their
    central ``band`` (``low``, ``high``), the predictive p-value (the fraction of replicates at
    or above the observed value) and whether the observed value lies outside the band."""
    low, high = np.quantile(replicated, [(1 - band) / 2, (1 + band) / 2], axis=0)
    return pd.DataFrame({
        "observed": observed,
        "predicted": replicated.mean(axis=0),
        "low": low,
        "high": high,
        "p_value": (replicated >= observed).mean(axis=0),
        "outside": (observed < low) | (observed > high),
    })


def _joined(comparisons: dict[str, pd.DataFrame], index: pd.Index) -> pd.DataFrame:
    """One table with a ``{statistic}_{column}`` column for each comparison."""
    return pd.concat([table.add_prefix(f"{name}_").set_index(index) for name, table in comparisons.items()], axis=1)


def check(
    counts,
    draws: PosteriorDraws,
    cell_log_offset: np.ndarray,
    gene_log_offset: np.ndarray,
    covariates: np.ndarray | None,
    *,
    cell_names,
    gene_names,
    seed: int,
    band: float = BAND,
    block_entries: int = BLOCK_ENTRIES,
) -> PredictiveCheck:
    """The posterior predictive check of ``counts`` (the checked cells x all genes), whose rows
    are the cells of ``draws``."""
    replicated, library_sizes = replicate(draws, cell_log_offset, gene_log_offset, covariates, seed, block_entries)
    observed = gene_statistics(counts)
    genes = _joined({name: compare(observed[name], replicated[name], band) for name in GENE_STATISTICS},
                    pd.Index([str(name) for name in gene_names], name="gene"))
    observed_library = np.asarray(sp.csr_matrix(counts).sum(axis=1), dtype=np.float64).ravel()
    cells = _joined({"library_size": compare(observed_library, library_sizes, band)},
                    pd.Index([str(name) for name in cell_names], name="cell"))
    return PredictiveCheck(genes, cells, library_sizes, verdict(genes, cells, draws.n_draws, band))


def verdict(genes: pd.DataFrame, cells: pd.DataFrame, n_draws: int, band: float = BAND) -> dict:
    """Fractions of genes (and cells) whose observed statistic lies outside the band. A model
    that fits has about ``1 - band`` or fewer: posterior uncertainty widens the bands."""
    outside = {name: float(genes[f"{name}_outside"].mean()) for name in GENE_STATISTICS}
    library = float(cells["library_size_outside"].mean())
    return {
        "band": band,
        "genes": len(genes),
        "cells": len(cells),
        "draws": n_draws,
        "genes_outside_band": outside,
        "cells_outside_band": {"library_size": library},
        "expected_outside_band_if_the_model_fits": round(1 - band, 10),
        "verdict": verdict_line(outside, library, band),
    }


def verdict_line(outside: dict[str, float], library: float, band: float = BAND) -> str:
    def percent(fraction):
        return f"{round(100 * fraction)} %"

    return (f"zero fraction outside the {percent(band)} band for {percent(outside['zero_fraction'])} of genes "
            f"(mean {percent(outside['mean'])}, variance {percent(outside['variance'])}; library size "
            f"{percent(library)} of cells; about {percent(1 - band)} or fewer if the model fits)")


def library_size_histogram(observed: np.ndarray, replicated: np.ndarray, bins: int = HISTOGRAM_BINS,
                           band: float = BAND) -> pd.DataFrame:
    """Cells per bin of log10 library size, observed and replicated (the replicates' mean and
    central band), on bins that span both."""
    log_observed, log_replicated = np.log10(observed + 1.0), np.log10(replicated + 1.0)
    edges = np.linspace(min(log_observed.min(), log_replicated.min()),
                        max(log_observed.max(), log_replicated.max()) + 1e-9, bins + 1)
    per_draw = np.stack([np.histogram(row, edges)[0] for row in log_replicated])
    low, high = np.quantile(per_draw, [(1 - band) / 2, (1 + band) / 2], axis=0)
    return pd.DataFrame({
        "log10_low": edges[:-1],
        "log10_high": edges[1:],
        "observed": np.histogram(log_observed, edges)[0],
        "predicted": per_draw.mean(axis=0),
        "low": low,
        "high": high,
    })


def typical_dispersion(draws: PosteriorDraws) -> float:
    """The median dispersion over draws (and genes): the alpha of the mean-variance curve."""
    return float(np.median(draws.alpha))
