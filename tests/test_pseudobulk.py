"""The pseudobulk cross-check: counts summed per sample (and level, when paired), PyDESeq2's test
of them, and its agreement with scnbvi's calls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scnbvi.design import build_design
from scnbvi.pseudobulk import agreement, pseudobulk_counts, pydeseq2_table


def _cells(seed=0, n_donors=6, cells_per_donor=30, n_genes=40, paired=False):
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(n_donors), cells_per_donor)
    if paired:
        condition = np.tile(["ctrl", "drug"], len(donor) // 2)
    else:
        condition = np.where(donor < n_donors // 2, "ctrl", "drug")
    obs = pd.DataFrame({"donor": [f"d{d}" for d in donor], "condition": condition},
                       index=[f"c{i}" for i in range(len(donor))])
    effect = np.where(np.arange(n_genes) < 8, np.log(4.0), 0.0)
    donor_shift = rng.normal(0, 0.2, (n_donors, n_genes))[donor]
    mu = np.exp(1.0 + donor_shift + (condition == "drug")[:, None] * effect)
    counts = sp.csr_matrix(rng.poisson(mu))
    return obs, counts, [f"g{i}" for i in range(n_genes)]


def test_counts_are_summed_per_sample_for_a_column_constant_within_samples():
    obs, counts, genes = _cells()
    design = build_design(obs, categorical=["condition"], random=["donor"])
    summed, groups = pseudobulk_counts(counts, design, "condition", genes)
    assert len(summed) == 6 and list(groups["sample"]) == [f"d{i}" for i in range(6)]
    assert list(groups["condition"]) == ["ctrl"] * 3 + ["drug"] * 3
    expected = np.asarray(counts[obs["donor"].eq("d4").to_numpy()].sum(axis=0)).ravel()
    np.testing.assert_array_equal(summed.iloc[4].to_numpy(), expected)
    assert summed.to_numpy().sum() == counts.sum()


def test_a_column_varying_within_samples_is_summed_per_sample_and_level():
    obs, counts, genes = _cells(paired=True)
    design = build_design(obs, categorical=["condition"], random=["donor"])
    assert not design.is_sample_level("condition")
    summed, groups = pseudobulk_counts(counts, design, "condition", genes)
    assert len(summed) == 12 and groups.groupby("sample").size().eq(2).all()
    assert summed.to_numpy().sum() == counts.sum()


@pytest.mark.parametrize("paired", [False, True])
def test_pydeseq2_finds_the_changed_genes_and_agrees_with_a_matching_table(paired):
    obs, counts, genes = _cells(paired=paired)
    design = build_design(obs, categorical=["condition"], random=["donor"])
    summed, groups = pseudobulk_counts(counts, design, "condition", genes)
    table = pydeseq2_table(summed, groups, ("condition", "drug", "ctrl"), paired=paired)
    called = set(table.index[table["padj"] < 0.05])
    assert {f"g{i}" for i in range(8)} <= called and len(called) <= 10
    assert table.loc["g0", "log2FoldChange"] == pytest.approx(2.0, abs=0.3)
    ours = pd.DataFrame({"log2_fold_change_unshrunk": table["log2FoldChange"],
                         "lfsr": np.where(table.index.isin([f"g{i}" for i in range(8)]), 0.001, 0.5)}, index=table.index)
    agreed = agreement(ours, table, 0.05)
    assert agreed["genes_compared"] == 40 and agreed["spearman_log2_fold_change"] == pytest.approx(1.0)
    assert agreed["calls_scnbvi"] == 8 and agreed["calls_in_common"] == 8
