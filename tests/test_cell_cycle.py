"""Cell-cycle scores: gene lists, scores and phases from scanpy, and the opt-in cell_cycle rule."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import make_adata, snakemake, write_config
from scnbvi.cell_cycle import cell_cycle_scores, read_gene_list
from scnbvi.errors import InputError

# Made-up gene names: the lists only have to match the data's names.
N_GENES = 600
GENES = [f"GENE{i}" for i in range(N_GENES)]
S_GENES, G2M_GENES = GENES[:12], GENES[12:24]
PHASES = np.repeat(["S", "G2M", "G1"], 100)


def cycling_adata() -> ad.AnnData:
    """100 cells each with S genes up, G2/M genes up, or both down; the rest spread over a wide range,
    so that scanpy samples control genes from bins larger than the lists."""
    rng = np.random.default_rng(0)
    rate = np.tile(rng.lognormal(np.log(3), 1.0, N_GENES), (len(PHASES), 1))
    rate[PHASES == "S", :12] *= 6
    rate[PHASES == "G2M", 12:24] *= 6
    rate[PHASES == "G1", :24] /= 6
    adata = make_adata(sp.csr_matrix(rng.poisson(rate).astype(np.int32)))
    adata.var_names = GENES
    return adata


def test_read_gene_list_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("# S phase\nMCM5\n\n  PCNA  \nTYMS # replication\n")
    assert read_gene_list(path) == ["MCM5", "PCNA", "TYMS"]


@pytest.mark.parametrize("text", [None, "", "# only a comment\n\n"])
def test_missing_or_empty_gene_list_names_the_file(tmp_path, text):
    path = tmp_path / "s.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError, match=r"s\.txt: file: .*; fix: ") as error:
        read_gene_list(path)
    assert "\n" not in str(error.value)


def test_scores_phases_and_index():
    adata = cycling_adata()
    table = cell_cycle_scores(adata, S_GENES, G2M_GENES)
    assert list(table.columns) == ["S_score", "G2M_score", "phase"]
    assert table.index.name == "cell" and list(table.index) == list(adata.obs_names)
    assert table["S_score"].dtype == float and table["G2M_score"].dtype == float
    assert set(table["phase"]) == {"G1", "S", "G2M"}
    assert (table["phase"].to_numpy() == PHASES).mean() > 0.95


def test_same_seed_same_scores_and_the_input_is_unchanged():
    adata = cycling_adata()
    before = adata.copy()
    first = cell_cycle_scores(adata, S_GENES, G2M_GENES, seed=3)
    pd.testing.assert_frame_equal(first, cell_cycle_scores(adata, S_GENES, G2M_GENES, seed=3))
    assert not first["S_score"].equals(cell_cycle_scores(adata, S_GENES, G2M_GENES, seed=4)["S_score"])
    assert adata.X.dtype == before.X.dtype and (adata.X != before.X).nnz == 0
    assert adata.obs.equals(before.obs) and adata.var.equals(before.var)
    assert not adata.layers and not adata.uns and adata.raw is None


def test_lists_matched_through_a_symbol_column_score_as_var_names_do():
    adata = cycling_adata()
    by_id = adata.copy()
    by_id.var["symbol"] = GENES
    by_id.var_names = [f"ENSG{i:011d}" for i in range(N_GENES)]
    pd.testing.assert_frame_equal(
        cell_cycle_scores(by_id, S_GENES, G2M_GENES, gene_symbols="symbol"),
        cell_cycle_scores(adata, S_GENES, G2M_GENES),
    )


def test_a_repeated_symbol_uses_its_first_gene(caplog):
    adata = cycling_adata()
    # The last gene takes the symbol of the first S gene: scores must not change, since the first one counts.
    symbols = GENES[:-1] + [S_GENES[0]]
    adata.var["symbol"] = symbols
    distinct = adata.copy()
    distinct.var["symbol"] = GENES
    with caplog.at_level(logging.INFO, logger="scnbvi"):
        repeated = cell_cycle_scores(adata, S_GENES, G2M_GENES, gene_symbols="symbol")
    assert f"first: {S_GENES[0]!r}" in caplog.text
    pd.testing.assert_frame_equal(repeated, cell_cycle_scores(distinct, S_GENES, G2M_GENES, gene_symbols="symbol"))


def test_matching_is_case_sensitive():
    with pytest.raises(InputError, match=r"0 of 12 S-phase genes"):
        cell_cycle_scores(cycling_adata(), [gene.lower() for gene in S_GENES], G2M_GENES)


def test_too_few_list_genes_in_the_data_names_the_counts_and_the_fix():
    s_genes = S_GENES[:3] + [f"MISSING{i}" for i in range(40)]
    with pytest.raises(InputError) as error:
        cell_cycle_scores(cycling_adata(), s_genes, G2M_GENES)
    message = str(error.value)
    assert message.startswith("config: cell_cycle.s_genes: 3 of 43 S-phase genes found in var_names, 10 needed")
    assert "first missing: ['MISSING0', 'MISSING1', 'MISSING2', 'MISSING3', 'MISSING4', ...]" in message
    assert message.endswith("fix: give lists that use the data's gene names, or set cell_cycle.gene_symbols "
                            "to the var column holding symbols")
    assert "\n" not in message


def test_a_short_list_must_be_found_whole():
    adata = cycling_adata()
    assert len(cell_cycle_scores(adata, S_GENES[:5], G2M_GENES[:5])) == adata.n_obs
    with pytest.raises(InputError, match=r"cell_cycle\.g2m_genes: 4 of 5 G2/M-phase genes found in var_names, 5 needed"):
        cell_cycle_scores(adata, S_GENES[:5], G2M_GENES[:4] + ["MISSING"])


def test_missing_symbol_column_is_named():
    with pytest.raises(InputError, match=r"cell_cycle\.gene_symbols: var column 'symbol' not found"):
        cell_cycle_scores(cycling_adata(), S_GENES, G2M_GENES, gene_symbols="symbol")


SIMULATED = {"simulate": {"n_cells": 200, "n_genes": 60}}


@pytest.mark.slow
def test_rule_scores_a_simulated_data_set_and_is_opt_in(workflow_copy):
    # Simulated genes are named gene00000, gene00001, ...
    (workflow_copy / "s_genes.txt").write_text("# S phase\n" + "".join(f"gene{g:05d}\n" for g in range(12)))
    (workflow_copy / "g2m_genes.txt").write_text("".join(f"gene{g:05d}\n" for g in range(12, 24)))
    lists = {"cell_cycle": {"s_genes": "s_genes.txt", "g2m_genes": "g2m_genes.txt", "seed": 1}}
    config = write_config(workflow_copy, {"datasets": {"sim": {**SIMULATED, **lists}}})
    result = snakemake(workflow_copy, "results/sim/cell_cycle.tsv", "--configfile", config)
    assert result.returncode == 0, result.stdout + result.stderr
    table = pd.read_csv(workflow_copy / "results" / "sim" / "cell_cycle.tsv", sep="\t", index_col="cell")
    cells = ad.read_h5ad(workflow_copy / "results" / "sim" / "selection.h5ad").obs_names
    assert list(table.index) == list(cells)
    assert list(table.columns) == ["S_score", "G2M_score", "phase"]
    assert np.isfinite(table[["S_score", "G2M_score"]].to_numpy()).all()
    assert set(table["phase"]) <= {"G1", "S", "G2M"}

    without = write_config(workflow_copy, {"datasets": {"sim": SIMULATED}}, name="without.yaml")
    result = snakemake(workflow_copy, "-n", "--configfile", without)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rule fit:" in result.stdout + result.stderr
    assert "rule cell_cycle:" not in result.stdout + result.stderr
