"""The load rule's QC from statistics gathered a block of cells at a time, and the slice from what load kept."""

import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scnbvi.data import (SELECTION_KEY, SelectedCounts, checked_count_blocks, read_counts, write_annotations,
                         write_selection)
from scnbvi.errors import InputError
from scnbvi.qc import (apply_qc_actions, count_statistics, gene_counts, loaded_annotations, qc_masks, qc_report,
                       report_of, slice_counts, slice_loaded)

ACTIONS = [dict(zip(("zero_cells", "zero_genes", "duplicate_cells"), choice))
           for choice in itertools.product(("keep", "drop"), repeat=3)]


def counts_with_repeats(seed=0, n_cells=40, n_genes=12) -> np.ndarray:
    """Poisson counts with all-zero cells and genes, and repeats across the blocks of a few cells."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.8, (n_cells, n_genes))
    dense[:, [2, 7]] = 0  # all-zero genes
    dense[[3, 17, 30]] = 0  # all-zero cells
    dense[9] = dense[1]
    dense[25] = dense[1]
    dense[33] = dense[20]
    dense[:, 11] = 0
    dense[5, 11] = 6  # a gene expressed only by a cell and its repeat
    dense[12] = dense[5]
    return dense


def written(tmp_path, dense, **columns) -> str:
    obs = pd.DataFrame({"batch": np.resize(["A", "B", "C"], len(dense)), **columns},
                       index=[f"c{i}" for i in range(len(dense))])
    var = pd.DataFrame({"symbol": np.resize(["x", "y"], dense.shape[1])},
                       index=[f"g{j}" for j in range(dense.shape[1])])
    path = tmp_path / "input.h5ad"
    ad.AnnData(X=sp.csr_matrix(dense), obs=obs, var=var).write_h5ad(path)
    return path


def expected_report(dense: np.ndarray) -> dict:
    seen, repeats = set(), 0
    for row in dense:
        repeats += tuple(row) in seen
        seen.add(tuple(row))
    return {"n_cells": dense.shape[0], "n_genes": dense.shape[1], "nnz": int(np.count_nonzero(dense)),
            "all_zero_cells": int(np.sum(~dense.any(axis=1))), "all_zero_genes": int(np.sum(~dense.any(axis=0))),
            "duplicate_cells": repeats}


def expected_masks(dense: np.ndarray, zero_cells, zero_genes, duplicate_cells):
    seen, first = set(), []
    for row in dense:
        first.append(tuple(row) not in seen)
        seen.add(tuple(row))
    keep_cells = (dense.any(axis=1) | (zero_cells == "keep")) & (np.array(first) | (duplicate_cells == "keep"))
    keep_genes = dense.any(axis=0) | (zero_genes == "keep")
    return keep_cells, keep_genes


def statistics_in_blocks(path, block_entries):
    with checked_count_blocks(path, block_entries=block_entries) as counts:
        return counts, count_statistics(counts.blocks, len(counts.var))


@pytest.mark.parametrize("actions", ACTIONS, ids=lambda actions: "-".join(f"{k}_{v}" for k, v in actions.items()))
@pytest.mark.parametrize("block_entries", [1, 3 * 12, 10**6], ids=["one-cell", "three-cells", "at-once"])
def test_report_and_masks_from_blocks_are_those_of_the_whole_matrix(tmp_path, actions, block_entries):
    dense = counts_with_repeats()
    path = written(tmp_path, dense)

    counts, statistics = statistics_in_blocks(path, block_entries)
    keep_cells, keep_genes = qc_masks(statistics, **actions)

    expected_cells, expected_genes = expected_masks(dense, **actions)
    np.testing.assert_array_equal(keep_cells, expected_cells)
    np.testing.assert_array_equal(keep_genes, expected_genes)
    every_cell, every_gene = np.ones_like(keep_cells), np.ones_like(keep_genes)
    assert report_of(statistics, every_cell, every_gene) == expected_report(dense)
    assert report_of(statistics, keep_cells, keep_genes) == expected_report(dense[keep_cells][:, keep_genes])
    # The same as the whole matrix read at once, reported, cleaned and reported again.
    whole = read_counts(path)
    assert report_of(statistics, every_cell, every_gene) == qc_report(whole)
    assert report_of(statistics, keep_cells, keep_genes) == qc_report(apply_qc_actions(whole, **actions))
    # What load writes: each kept cell's total over all genes, each kept gene's totals over the kept cells.
    obs, var = loaded_annotations(counts.obs, counts.var, statistics, keep_cells, keep_genes)
    kept = dense[keep_cells][:, keep_genes]
    assert list(obs.index) == list(counts.obs.index[keep_cells]) and list(obs.columns) == ["batch", "total_counts"]
    np.testing.assert_array_equal(obs["total_counts"], dense[keep_cells].sum(axis=1))
    pd.testing.assert_frame_equal(var[["total_counts", "n_cells_expressed"]],
                                  gene_counts(sp.csr_matrix(kept), counts.var.index[keep_genes]), check_names=False)
    assert statistics.dtype == np.int32


def test_repeats_are_found_across_blocks_stored_in_other_integer_types(tmp_path):
    """A block holding a count beyond int32 is int64: a small repeat in it still repeats an int32 block's cell."""
    dense = counts_with_repeats().astype(np.int64)
    dense[36, 0] = 2**33
    dense[37] = dense[1]
    path = written(tmp_path, dense)

    _, statistics = statistics_in_blocks(path, 3 * 12)

    assert statistics.dtype == np.int64
    assert report_of(statistics, np.ones(40, dtype=bool), np.ones(12, dtype=bool)) == expected_report(dense)
    assert statistics.repeats[37]


def test_every_cell_dropped_is_an_error():
    statistics = count_statistics([sp.csr_matrix((3, 2), dtype=np.int32)], 2)
    with pytest.raises(InputError, match="every cell has zero counts"):
        qc_masks(statistics, zero_cells="drop")


def load_as_the_rule_does(path, loaded_path, block_entries=3 * 12, **actions):
    """The load rule's loaded.h5ad, from blocks of a few cells."""
    counts, statistics = statistics_in_blocks(path, block_entries)
    keep_cells, keep_genes = qc_masks(statistics, **actions)
    obs, var = loaded_annotations(counts.obs, counts.var, statistics, keep_cells, keep_genes)
    write_annotations(obs, var, statistics.dtype, loaded_path, strings_to_categoricals=False)
    return ad.read_h5ad(loaded_path)


SLICINGS = {
    "defaults": {},
    "random-dropping-zeros": {"cells_method": "random", "n_cells": 15, "genes_method": "random", "n_genes": 6,
                              "drop_zero_cells": True, "drop_zero_genes": True, "seed": 3},
    "all-cells-dropping-zeros": {"genes_method": "first", "n_genes": 4, "drop_zero_cells": True,
                                 "drop_zero_genes": True},
    "filtered-first": {"obs_filters": {"batch": ["A", "C"]}, "cells_method": "first", "n_cells": 20},
    "hvg": {"genes_method": "hvg", "n_genes": 5, "obs_filters": {"batch": ["B", "C"]}},
}


@pytest.mark.parametrize("actions", [ACTIONS[0], ACTIONS[-1]], ids=["keep-all", "drop-all"])
@pytest.mark.parametrize("slicing", SLICINGS.values(), ids=SLICINGS.keys())
def test_slice_from_loaded_is_the_slice_of_the_counts_in_memory(tmp_path, slicing, actions):
    rng = np.random.default_rng(1)
    dense = counts_with_repeats(n_cells=90, n_genes=40)
    dense[:, 20:] = rng.negative_binomial(0.3, 0.1, (90, 20))  # varying genes, for hvg
    dense[[3, 17, 30]] = 0
    path = written(tmp_path, dense, barcode=[f"b{i % 60}" for i in range(90)], unique=[f"u{i}" for i in range(90)])
    loaded = load_as_the_rule_does(path, tmp_path / "loaded.h5ad", **actions)
    rows_read = []

    def read_rows(positions):
        rows_read.append(len(positions))
        with SelectedCounts(path, tmp_path / "loaded.h5ad") as counts:
            yield from counts.blocks(5 * 40, positions)

    obs, var = slice_loaded(loaded, read_rows, **slicing)
    write_annotations(obs, var, loaded.uns[SELECTION_KEY]["dtype"], tmp_path / "selection.h5ad")

    # What the slice rule wrote before: the whole input in memory, cleaned, sliced, its genes counted.
    in_memory = apply_qc_actions(read_counts(path), **actions)
    in_memory.obs["total_counts"] = np.asarray(in_memory.X.sum(axis=1)).ravel()
    sliced = slice_counts(in_memory, **slicing)
    for column, values in gene_counts(sliced.X, sliced.var_names).items():
        sliced.var[column] = values.to_numpy()
    write_selection(sliced, tmp_path / "expected.h5ad")
    selection, expected = ad.read_h5ad(tmp_path / "selection.h5ad"), ad.read_h5ad(tmp_path / "expected.h5ad")
    pd.testing.assert_frame_equal(selection.obs, expected.obs)
    pd.testing.assert_frame_equal(selection.var, expected.var)
    assert selection.uns == expected.uns
    assert rows_read == ([] if not slicing else [len(cells_read(slicing, in_memory))])


def cells_read(slicing, adata):
    """The cells the slice reads: those selected before all-zero cells are dropped."""
    before_dropping = {key: value for key, value in slicing.items() if not key.startswith("drop_zero")}
    return slice_counts(adata, **before_dropping).obs_names


def test_slice_with_every_cell_and_gene_reads_no_counts(tmp_path):
    path = written(tmp_path, counts_with_repeats())
    loaded = load_as_the_rule_does(path, tmp_path / "loaded.h5ad", zero_cells="drop")

    def read_rows(positions):
        raise AssertionError("the counts were read")

    obs, var = slice_loaded(loaded, read_rows, genes_method="hvg", n_genes=None)

    pd.testing.assert_frame_equal(obs, loaded.obs)
    pd.testing.assert_frame_equal(var, loaded.var)
