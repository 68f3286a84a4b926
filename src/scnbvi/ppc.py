"""Posterior predictive checks: counts replicated from the posterior draws, compared with the
observed counts per gene (zero fraction, mean, variance) and per cell (library size).

The replicates are never drawn: given a draw the counts are independent NB, so each statistic's
mean and variance over replicated data sets are closed forms of the draw's parameters, and its
band is that of the mixture over draws of their normal approximations. This reads every cell x
gene x draw once, in one compiled pass, instead of drawing and reducing a count for each.

A model that fits leaves each observed statistic inside the band of its replicates for most
genes; a dispersion that is too small or too large, or a missing covariate, shows up as many
genes outside the band, most visibly in the zero fraction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special

from scnbvi.compilation_cache import use_compilation_cache
from scnbvi.design import Design
from scnbvi.errors import InputError
from scnbvi.likelihood.moments import cumulants, log_zero_probability
from scnbvi.trace import trace_group

if TYPE_CHECKING:
    import arviz as az

BAND = 0.9  # mass of the band of replicated statistics
BLOCK_ENTRIES = 2**18  # cells x genes at once: the terms of a block stay in cache
GENE_STATISTICS = ("zero_fraction", "mean", "variance")
HISTOGRAM_BINS = 30
PROGRESS_SECONDS = 10
TINY = float(np.finfo(np.float32).tiny)  # the smallest sd: the bands are computed in float32

# Its lines are progress: on the terminal as well as in the log (minutes at atlas size otherwise silent).
log = logging.getLogger("scnbvi.progress")


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
    """Per-gene and per-cell comparisons (see :func:`compare`), replicated library sizes (draws x
    cells, drawn from each draw's normal approximation: the histogram's) and the verdict."""

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
    """The draws the likelihood reads, for ``cells``: a seeded choice of at most ``max_draws`` of
    the joint draws the posterior keeps (inference.local_draws of them; per-gene ones have no
    more), over all chains, as float64."""
    posterior = trace_group(idata, "posterior").stack(sample=("chain", "draw"))
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


def replicated_moments(
    draws: PosteriorDraws,
    cell_log_offset: np.ndarray,
    gene_log_offset: np.ndarray,
    covariates: np.ndarray | None,
    block_entries: int = BLOCK_ENTRIES,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """The mean and standard deviation, per draw, of each statistic of the data set that draw
    replicates: per gene (each draws x genes) and of the library sizes (draws x cells).

    log mu_ig = gene_effect_g + cell_effect_i + cell_log_offset_i + gene_log_offset_g
    + covariates_i . beta_g, with ``covariates`` centred as the model centres them. The counts
    are independent NB given a draw, so the zero fraction, the mean and the library size are
    sums of independent terms (their variances add); the variance over cells, (1/n) sum (y_i -
    ybar)^2, has its mean in closed form and its variance to first order in the counts'
    deviations, from their third and fourth cumulants. Genes are taken in blocks of about
    ``block_entries`` cells x genes, so memory stays bounded at any size.
    """
    n_draws, n_cells = draws.cell_effect.shape
    n_genes = len(gene_log_offset)
    block = min(n_genes, max(1, block_entries // n_cells))
    padded = -(-n_genes // block) * block
    if covariates is None:
        covariates, beta = np.zeros((n_cells, 1)), np.zeros((n_draws, n_genes, 1))
    else:
        beta = draws.beta
    gene_sums = np.zeros((6, n_draws, n_genes))  # the six sums over cells of _block_sums
    cell_sums = np.zeros((2, n_draws, n_cells))
    started = reported = time.perf_counter()
    for d in range(n_draws):
        gene_rate = _padded(draws.gene_effect[d] + gene_log_offset, padded, -np.inf)
        alpha = _padded(np.broadcast_to(draws.alpha[d], (n_genes,)), padded, 1.0)
        gene_beta = _padded(beta[d], padded, 0.0)
        cell_rate = draws.cell_effect[d] + cell_log_offset
        for start in range(0, padded, block):
            genes = slice(start, start + block)
            per_gene, per_cell = _block_sums(cell_rate, gene_rate[genes], alpha[genes], covariates, gene_beta[genes])
            kept = slice(start, min(start + block, n_genes))
            gene_sums[:, d, kept] = np.asarray(per_gene)[:, : kept.stop - start]
            cell_sums[:, d] += np.asarray(per_cell)
        if time.perf_counter() - reported > PROGRESS_SECONDS:
            reported = time.perf_counter()
            log.info("posterior predictive check: %d of %d draws, %.0f s", d + 1, n_draws, reported - started)
    mu, second, zeros, zero_variance, spread, spread_variance = gene_sums
    n = n_cells
    genes = {
        "zero_fraction": (zeros / n, np.sqrt(zero_variance) / n),
        "mean": (mu / n, np.sqrt(second) / n),
        "variance": (spread / n + (1 - 1 / n) * second / n, np.sqrt(spread_variance / n**2 + 2 * (second / n**2) ** 2)),
    }
    return genes, (cell_sums[0], np.sqrt(cell_sums[1]))


def _padded(values: np.ndarray, size: int, fill: float) -> np.ndarray:
    """``values`` (genes first) extended to ``size`` genes with ``fill``, as float32."""
    extra = np.full((size - len(values), *np.shape(values)[1:]), fill)
    return np.concatenate([values, extra]).astype(np.float32)


@jax.jit
def _block_sums(cell_rate, gene_rate, alpha, covariates, beta):
    """Per gene (over cells) and per cell (over genes), the sums the statistics' moments need,
    for a block of cells x genes: a padding gene (rate -inf) adds nothing to a cell.

    The terms are computed in one elementwise pass and summed by products with a vector of
    ones: a sum fused with its terms runs on one core without vector instructions, several
    times slower. Blocks whose terms fit in cache keep the pass from waiting on memory.
    """
    mu = jnp.exp(cell_rate[:, None] + gene_rate[None, :] + covariates @ beta.T)
    second, third, fourth = cumulants(mu, alpha)
    nonzero = -jnp.expm1(log_zero_probability(mu, alpha, jnp))
    mu, second, third, fourth, nonzero = jax.lax.optimization_barrier((mu, second, third, fourth, nonzero))
    over_cells, over_genes = jnp.ones(len(cell_rate), mu.dtype), jnp.ones(len(gene_rate), mu.dtype)
    spread = mu - over_cells @ mu / len(cell_rate)
    terms = jax.lax.optimization_barrier((
        mu,
        second,
        1 - nonzero,
        (1 - nonzero) * nonzero,
        spread**2,
        4 * spread * (spread * second + third) + fourth + 2 * second**2,
    ))
    return jnp.stack([over_cells @ term for term in terms]), jnp.stack([mu @ over_genes, second @ over_genes])


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


def compare(observed: np.ndarray, means: np.ndarray, sds: np.ndarray, band: float = BAND, step: float = 0.0,
            highest: float = np.inf, skewed: bool = False) -> pd.DataFrame:
    """Observed against its replicates, one normal N(means_d, sds_d^2) per draw (draws x items):
    the replicates' mean (``predicted``), the central ``band`` of the mixture over draws (``low``,
    ``high``), the predictive p-value (the probability of a replicate at or above the observed
    value) and whether the observed value lies outside the band.

    A statistic on a lattice of ``step`` (a count over cells, divided by their number) gets the
    continuity correction and band limits on the lattice, as replicated counts would give; a
    ``skewed`` one (the variance over cells of overdispersed counts) a log-normal of the same
    mean and variance instead of the normal. All statistics lie in [0, ``highest``].
    """
    predicted = means.mean(axis=0)
    shift = step / 2
    if skewed:
        log_variance = np.log1p((sds / np.maximum(means, TINY)) ** 2)
        means, sds = np.log(np.maximum(means, TINY)) - log_variance / 2, np.sqrt(log_variance)
        with np.errstate(divide="ignore"):
            observed_scale = np.log(observed)
    else:
        observed_scale = observed
    sds = np.maximum(sds, TINY)
    low, high = np.asarray(_mixture_quantiles(means, sds, jnp.array([(1 - band) / 2, (1 + band) / 2])), np.float64)
    if skewed:
        low, high = np.exp(low), np.exp(high)
    if step:
        low, high = step * np.ceil((low - shift) / step), step * np.ceil((high - shift) / step)
    low, high = np.clip(low, 0.0, highest), np.clip(high, 0.0, highest)
    return pd.DataFrame({
        "observed": observed,
        "predicted": predicted,
        "low": low,
        "high": high,
        "p_value": special.ndtr((means - observed_scale + shift) / sds).mean(axis=0),
        "outside": (observed < low) | (observed > high),
    })


@partial(jax.jit, static_argnames="iterations")
def _mixture_quantiles(means, sds, levels, iterations=20):
    """Quantiles (levels x items) of the equal mixture over draws of N(means_d, sds_d^2), by
    bisection (the mixture's CDF has no inverse) between the smallest and the largest of its
    normals' quantiles, which bracket it: 20 halvings leave a millionth of that bracket."""
    means, sds = jnp.asarray(means, jnp.float32), jnp.asarray(sds, jnp.float32)
    each = means + jax.scipy.special.ndtri(levels)[:, None, None] * sds
    lower, upper = each.min(axis=1), each.max(axis=1)

    def halve(_, bounds):
        lower, upper = bounds
        middle = (lower + upper) / 2
        # erf, a polynomial in XLA, is cheaper than ndtr and exact enough at 5 %.
        below = jax.lax.erf((middle[:, None] - means) / (sds * np.sqrt(2))).mean(axis=1) < 2 * levels[:, None] - 1
        return jnp.where(below, middle, lower), jnp.where(below, upper, middle)

    lower, upper = jax.lax.fori_loop(0, iterations, halve, (lower, upper))
    return (lower + upper) / 2


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
    are the cells of ``draws``. The replicated library sizes (for the histogram) are drawn, with
    ``seed``, from each draw's normal approximation; the bands and p-values need no draws."""
    use_compilation_cache()
    started = time.perf_counter()
    replicated, (library_means, library_sds) = replicated_moments(draws, cell_log_offset, gene_log_offset, covariates,
                                                                  block_entries)
    log.info("posterior predictive check: moments of %d draws x %d cells x %d genes, %.1f s", draws.n_draws,
             len(cell_log_offset), len(gene_log_offset), time.perf_counter() - started)
    observed = gene_statistics(counts)
    step = 1 / counts.shape[0]
    shapes = {"zero_fraction": (step, 1.0, False), "mean": (step, np.inf, False), "variance": (0.0, np.inf, True)}
    genes = _joined({name: compare(observed[name], *replicated[name], band, *shapes[name]) for name in GENE_STATISTICS},
                    pd.Index([str(name) for name in gene_names], name="gene"))
    observed_library = np.asarray(sp.csr_matrix(counts).sum(axis=1), dtype=np.float64).ravel()
    cells = _joined({"library_size": compare(observed_library, library_means, library_sds, band, 1.0)},
                    pd.Index([str(name) for name in cell_names], name="cell"))
    library_sizes = np.maximum(np.rint(np.random.default_rng(seed).normal(library_means, library_sds)), 0.0)
    log.info("posterior predictive check: bands, %.1f s", time.perf_counter() - started)
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
