"""The pseudobulk cross-check: each sample's counts summed and tested with PyDESeq2, the field's
standard when samples replicate a condition (Squair et al. 2021), beside scnbvi's own table."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from scnbvi.cell_rows import weighted_sums
from scnbvi.design import Design


def pseudobulk_counts(counts, design: Design, column: str, gene_names) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Counts (a matrix, or a store of rows: :mod:`scnbvi.cell_rows`) summed per sample and level of
    ``column`` (one group per sample for a column constant within samples; sample x level for one that
    varies within them, a paired design): (groups x genes counts, groups' sample and level)."""
    sample = np.asarray(design.samples.levels)[design.sample_of_cells()]
    level = design.level_of_cells(column)
    groups = pd.Series(sample, dtype=str).str.cat(pd.Series(level, dtype=str), sep="|")
    codes, names = pd.factorize(groups, sort=True)
    membership = np.zeros((len(names), len(codes)))
    membership[codes, np.arange(len(codes))] = 1.0
    summed = weighted_sums(counts, membership).round().astype(np.int64)
    metadata = pd.DataFrame([name.split("|", 1) for name in names], columns=["sample", column],
                            index=pd.Index([f"group{i}" for i in range(len(names))], name="group"))
    return pd.DataFrame(summed, index=metadata.index, columns=list(gene_names)), metadata


def pydeseq2_table(summed: pd.DataFrame, metadata: pd.DataFrame, contrast: tuple[str, str, str],
                   *, paired: bool) -> pd.DataFrame:
    """DESeq2's Wald test of the contrast (``~ sample + column`` when paired): baseMean,
    log2FoldChange, lfcSE, stat, pvalue, padj per gene, as PyDESeq2 writes them."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    column, numerator, denominator = contrast
    # PyDESeq2's formula reads column names as Python names; the real name is only in the labels.
    metadata = metadata.rename(columns={column: "level"})
    kept = summed.columns[summed.sum(axis=0) > 0]
    dds = DeseqDataSet(counts=summed[kept], metadata=metadata, design="~sample + level" if paired else "~level",
                       inference=DefaultInference(n_cpus=1), quiet=True)
    dds.deseq2()
    result = DeseqStats(dds, contrast=["level", numerator, denominator], inference=DefaultInference(n_cpus=1),
                        quiet=True)
    result.summary()
    table = result.results_df.reindex(summed.columns)
    table.index.name = "gene"
    return table.sort_values("padj", kind="stable")


def agreement(scnbvi: pd.DataFrame, pseudobulk: pd.DataFrame, level: float) -> dict:
    """Calls of each side at ``level`` (scnbvi: lfsr; pseudobulk: BH-adjusted p), the calls in
    common with the same sign, and the Spearman correlation of the log2 fold changes."""
    joined = scnbvi[["log2_fold_change_unshrunk", "lfsr"]].join(
        pseudobulk[["log2FoldChange", "padj"]], how="inner").dropna()
    ours = joined["lfsr"] < level
    theirs = joined["padj"] < level
    same_sign = np.sign(joined["log2_fold_change_unshrunk"]) == np.sign(joined["log2FoldChange"])
    rho = stats.spearmanr(joined["log2_fold_change_unshrunk"], joined["log2FoldChange"]).statistic
    return {"genes_compared": int(len(joined)), "calls_scnbvi": int(ours.sum()), "calls_pseudobulk": int(theirs.sum()),
            "calls_in_common": int((ours & theirs & same_sign).sum()), "spearman_log2_fold_change": float(rho)}
