"""Bayesian differential expression: a contrast between two levels of a design column, per gene,
read off the posterior draws of the covariate effects."""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from scnbvi.design import Design


def level_mask(design: Design, column: str, level: str) -> np.ndarray:
    """The cells at ``level`` of a categorical design column (the reference: no other level)."""
    reference, levels = design.factors[column]
    indicators = {name: design.matrix[:, design.names.index(f"{column}[{name}]")] > 0.5 for name in levels}
    if level == reference:
        return ~np.any(list(indicators.values()), axis=0) if indicators else np.ones(len(design.matrix), bool)
    return indicators[level]


def contrast_table(
    idata: az.InferenceData,
    design: Design,
    contrast: tuple[str, str, str],
    counts: sp.spmatrix,
    depth: np.ndarray,
    *,
    lfc_threshold: float = 0.5,
    credible_mass: float = 0.95,
) -> pd.DataFrame:
    """One row per gene, sorted by local false sign rate.

    ``log2_fold_change`` is numerator vs denominator, from the draws of ``beta``; ``lfsr`` is
    the posterior probability of the less likely sign (Stephens 2017), the Bayesian
    counterpart of a p-value adjusted for sign errors; ``prob_large_change`` is
    P(|log2FC| > ``lfc_threshold``). ``base_mean`` is the gene's mean count per cell after
    scaling each cell to the mean depth, as DESeq2's baseMean.
    """
    column, numerator, denominator = contrast
    weights = design.contrast_weights(column, numerator, denominator)
    beta = idata.posterior["beta"].stack(sample=("chain", "draw")).transpose("gene", "coefficient", "sample")
    log2_fc = np.einsum("gks,k->gs", beta.values.astype(np.float64), weights) / np.log(2.0)
    # Under the fitted q a contrast is a linear function of Gaussian coordinates, so it is
    # Gaussian itself: tail probabilities come from its mean and sd, and stay exact far beyond
    # the resolution (1 / draws) of counting draws.
    mean, sd = log2_fc.mean(axis=1), log2_fc.std(axis=1)
    half_width = stats.norm.ppf(0.5 + credible_mass / 2) * sd
    counts = sp.csr_matrix(counts)
    size_factor = np.asarray(depth, dtype=np.float64) / np.mean(depth)
    normalised_mean = np.asarray((sp.diags(1.0 / size_factor) @ counts).mean(axis=0)).ravel()
    expressed = counts > 0
    label = f"{int(round(100 * credible_mass))}"
    table = pd.DataFrame(
        {
            "base_mean": normalised_mean,
            "log2_fold_change": mean,
            "log2_fold_change_sd": sd,
            f"ci{label}_low": mean - half_width,
            f"ci{label}_high": mean + half_width,
            "lfsr": stats.norm.cdf(-np.abs(mean) / sd),
            "prob_large_change": stats.norm.sf((lfc_threshold - mean) / sd) + stats.norm.cdf((-lfc_threshold - mean) / sd),
            f"cells_expressing_{numerator}": _cells_expressing(expressed, level_mask(design, column, numerator)),
            f"cells_expressing_{denominator}": _cells_expressing(expressed, level_mask(design, column, denominator)),
        },
        index=pd.Index(beta["gene"].values, name="gene"),
    )
    return table.sort_values(["lfsr", "prob_large_change"], ascending=[True, False], kind="stable")


def _cells_expressing(expressed: sp.csr_matrix, cells: np.ndarray) -> np.ndarray:
    return np.asarray(expressed[cells].sum(axis=0)).ravel().astype(np.int64)
