"""Bayesian differential expression: a contrast between two levels of a design column, per gene.

Three steps, each a documented choice (docs in the README's DE section):

1. The unshrunk estimate and its standard error. For a column that varies between cells, from
   the posterior of the covariate effects (cells are the replicates); for a column constant
   within samples (with ``design.random``), from the samples' fitted effects, between-sample
   spread included (:mod:`scnbvi.samples`).
2. Composition: a shift shared by nearly every gene (a few strong changes move every cell's
   total, and with it every other gene's depth-normalised level) is removed by centring the
   contrast on the median of its better-measured half of the genes, the assumption behind
   DESeq2's median-of-ratios and edgeR's TMM (``de.centre: none`` keeps it).
3. Adaptive shrinkage across genes (:mod:`scnbvi.shrinkage`): lfsr, s-values and shrunk fold
   changes that keep their error rate when most genes do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scnbvi.cell_rows import weighted_sums
from scnbvi.design import Design
from scnbvi.samples import sample_contrast
from scnbvi.shrinkage import adaptive_shrinkage
from scnbvi.trace import posterior_statistics

if TYPE_CHECKING:
    import arviz as az


@dataclass(frozen=True)
class ContrastResult:
    """The per-gene table and what the log and the plots say about the contrast as a whole."""

    table: pd.DataFrame
    replicates: str  # "cells" or "samples"
    units: dict  # level -> cells or samples at that level
    composition_shift: float  # log2, removed from every gene (0 with centre: none)
    null_share: float  # the shrinkage prior's share of genes without change
    sample_sd: float | None = None  # log2, the typical sd of a gene between samples

    def describe(self) -> str:
        numerator, denominator = self.units
        line = (f"replicates: {self.replicates} ({self.units[numerator]:,} {numerator} vs "
                f"{self.units[denominator]:,} {denominator}); composition shift removed: "
                f"{self.composition_shift:+.3f} log2; genes estimated unchanged: {self.null_share:.1%}")
        if self.sample_sd is not None:
            line += f"; typical sd between samples: {self.sample_sd:.3f} log2"
        return line


def contrast_table(
    idata: az.InferenceData,
    design: Design,
    contrast: tuple[str, str, str],
    counts,
    depth: np.ndarray,
    *,
    lfc_threshold: float = 0.5,
    credible_mass: float = 0.95,
    centre: str = "median",
    symbols: pd.Series | None = None,
) -> ContrastResult:
    """One row per gene, sorted by local false sign rate.

    ``log2_fold_change`` is numerator vs denominator, shrunk; ``lfsr`` is the posterior
    probability of the less likely sign (Stephens 2017), ``svalue`` the mean lfsr of all genes
    at least as significant (the share of sign errors among them that the model expects; on
    real cells ``lfsr < 0.05`` is the call that held its rate); ``prob_large_change`` is
    P(|log2FC| > ``lfc_threshold``). ``base_mean`` is the gene's mean count per cell after
    scaling each cell to the mean depth, as DESeq2's baseMean, read from ``counts`` (a matrix, or a
    store of rows that streams them: :mod:`scnbvi.cell_rows`) a block at a time. ``symbols`` (indexed by gene,
    from ``load.gene_symbols``) become the first column, ``symbol``.
    """
    column, numerator, denominator = contrast
    weights = design.contrast_weights(column, numerator, denominator)
    # Every draw's moments (the fit's statistics): the same with a trace that keeps fewer draws.
    statistics = posterior_statistics(idata)
    genes = statistics["gene"].values
    mean = statistics["beta"].sel(statistic="mean").transpose("gene", "coefficient").values / np.log(2.0)
    covariance = statistics["beta_covariance"].transpose("gene", "coefficient", "other_coefficient").values
    covariance = covariance.astype(np.float64) / np.log(2.0) ** 2
    masks = {level: design.level_mask(column, level) for level in (numerator, denominator)}
    extra, sample_sd = {}, None
    if design.is_sample_level(column):
        samples = design.samples
        positions = design.sample_indicator_positions()
        effects = np.zeros((len(genes), len(samples.levels)))
        effects[:, 1:] = mean[:, positions]
        # How precisely the fit pins each gene's sample effects: the counting noise in the spread
        # between samples, which the variance prior follows across genes.
        indicator_variance = np.diagonal(covariance, axis1=1, axis2=2)[:, positions]
        measurement_noise = np.log(indicator_variance.mean(axis=1) + 1e-12)
        result = sample_contrast(effects, samples.matrix, weights, measurement_noise)
        estimate, se, df = result.estimate, result.se, result.df
        extra = {"sample_sd": result.sample_sd, "df": np.full(len(estimate), result.df)}
        sample_sd = result.prior_sd
        replicates = "samples"
        units = {level: int(samples.at_level(column, level).sum()) for level in (numerator, denominator)}
    else:
        # Under the fitted q a contrast is a linear function of Gaussian coordinates, so it is
        # Gaussian itself: its mean and sd say all.
        estimate = mean @ weights
        se = np.sqrt(np.maximum(np.einsum("gkl,k,l->g", covariance, weights, weights), 0.0))
        df = np.inf
        replicates = "cells"
        units = {level: int(mask.sum()) for level, mask in masks.items()}
    shift = composition_shift(estimate, se) if centre == "median" else 0.0
    estimate = estimate - shift
    shrunk = adaptive_shrinkage(estimate, se, df=df, lfc_threshold=lfc_threshold, credible_mass=credible_mass)

    size_factor = np.asarray(depth, dtype=np.float64) / np.mean(depth)
    normalised_mean = weighted_sums(counts, 1.0 / size_factor / len(size_factor))[0]
    expressing = weighted_sums(counts, np.stack(list(masks.values())), expressed=True).round().astype(np.int64)
    label = f"{int(round(100 * credible_mass))}"
    table = pd.DataFrame(
        {
            "base_mean": normalised_mean,
            "log2_fold_change": shrunk.mean,
            "log2_fold_change_sd": shrunk.sd,
            f"ci{label}_low": shrunk.ci_low,
            f"ci{label}_high": shrunk.ci_high,
            "lfsr": shrunk.lfsr,
            "svalue": shrunk.svalue,
            "prob_large_change": shrunk.prob_large_change,
            "log2_fold_change_unshrunk": estimate,
            "log2_fold_change_unshrunk_sd": se,
            **extra,
            **{f"cells_expressing_{level}": cells for level, cells in zip(masks, expressing)},
        },
        index=pd.Index(genes, name="gene"),
    )
    if symbols is not None:
        table.insert(0, "symbol", symbols.reindex(table.index).to_numpy())
    table = table.sort_values(["lfsr", "prob_large_change"], ascending=[True, False], kind="stable")
    return ContrastResult(table, replicates, units, float(shift), shrunk.null_share, sample_sd)


def composition_shift(estimate: np.ndarray, se: np.ndarray) -> float:
    """The median log2 fold change of the better-measured half of the genes: the shift most genes
    share when only a minority truly change."""
    return float(np.median(estimate[se <= np.median(se)]))
