"""What to keep of the counts: the QC report of all-zero and repeated cells, the actions that drop them,
and the slicing of cells and genes to fit."""

import hashlib
import numbers
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scnbvi.data import as_csr
from scnbvi.errors import InputError

QC_ACTIONS = ("keep", "drop")
CELL_METHODS = ("all", "first", "random")
GENE_METHODS = ("all", "first", "random", "hvg")
HVG_MIN_VARYING_GENES = 10
INT32_MAX = np.iinfo(np.int32).max


class CountStatistics(NamedTuple):
    """What the QC report, the QC actions and the loaded cells' and genes' totals need of the counts: gathered
    a block of cells at a time (``count_statistics``), so that no step holds more than one block."""

    cell_nnz: np.ndarray  # stored non-zero counts of each cell
    cell_totals: np.ndarray  # each cell's total count
    repeats: np.ndarray  # True for a cell whose counts equal those of an earlier cell
    gene_nnz: np.ndarray  # cells expressing each gene
    gene_totals: np.ndarray
    repeat_gene_nnz: np.ndarray  # the same over the repeating cells only
    repeat_gene_totals: np.ndarray
    dtype: np.dtype  # the largest integer type of the blocks: the counts' type once stacked


def count_statistics(blocks, n_genes: int) -> CountStatistics:
    """The statistics of the counts given as consecutive blocks of cells (any matrices, stored zeros and
    repeated entries allowed), in one pass."""
    seen = set()
    cell_parts = {"nnz": [], "totals": [], "repeats": []}
    gene_nnz, gene_totals, repeat_gene_nnz, repeat_gene_totals = (np.zeros(n_genes, dtype=np.int64) for _ in range(4))
    dtype = None
    for block in blocks:
        counts = _canonical_csr(block)
        if dtype is None or counts.dtype.itemsize > dtype.itemsize:
            dtype = counts.dtype
        repeats = _repeated_rows(counts, seen)
        cell_parts["nnz"].append(np.diff(counts.indptr))
        # Sums as products with vectors of ones: compiled loops over the stored entries, in int64.
        cell_parts["totals"].append(_as_int64(counts @ np.ones(n_genes, dtype=np.int64)))
        cell_parts["repeats"].append(repeats)
        gene_nnz += np.bincount(counts.indices, minlength=n_genes)
        gene_totals += _as_int64(np.ones(counts.shape[0], dtype=np.int64) @ counts)
        if repeats.any():
            repeat_gene_nnz += np.bincount(counts.indices[np.repeat(repeats, np.diff(counts.indptr))],
                                           minlength=n_genes)
            repeat_gene_totals += _as_int64(repeats.astype(np.int64) @ counts)
    cells = {name: np.concatenate(parts) for name, parts in cell_parts.items()}
    return CountStatistics(cells["nnz"].astype(np.int64), cells["totals"], cells["repeats"], gene_nnz, gene_totals,
                           repeat_gene_nnz, repeat_gene_totals, dtype)


def qc_report(adata: ad.AnnData) -> dict:
    """Count the cells and genes that a user may want to drop before fitting."""
    statistics = count_statistics([adata.X], adata.n_vars)
    return report_of(statistics, np.ones(adata.n_obs, dtype=bool), np.ones(adata.n_vars, dtype=bool))


def report_of(statistics: CountStatistics, keep_cells: np.ndarray, keep_genes: np.ndarray) -> dict:
    """``qc_report`` of the kept cells and genes, from the statistics of all of them. The QC actions drop
    only all-zero genes, which leave every cell's counts and their equality as they were, and all-zero
    cells and repeats whose first occurrence stays, which leave the genes expressed as they were."""
    return {
        "n_cells": int(keep_cells.sum()),
        "n_genes": int(keep_genes.sum()),
        "nnz": int(statistics.cell_nnz[keep_cells].sum()),
        "all_zero_cells": int(np.sum(statistics.cell_nnz[keep_cells] == 0)),
        "all_zero_genes": int(np.sum(statistics.gene_nnz[keep_genes] == 0)),
        "duplicate_cells": int(statistics.repeats[keep_cells].sum()),
    }


def qc_masks(statistics: CountStatistics, zero_cells="drop", zero_genes="keep",
             duplicate_cells="keep") -> tuple[np.ndarray, np.ndarray]:
    """The cells and genes that the QC actions keep (``apply_qc_actions``), from the counts' statistics."""
    actions = {"zero_cells": zero_cells, "zero_genes": zero_genes, "duplicate_cells": duplicate_cells}
    for name, action in actions.items():
        if action not in QC_ACTIONS:
            raise InputError("config", f"load.{name}", f"unknown action {action!r}", "use 'keep' or 'drop'")
    keep_cells = np.ones(len(statistics.cell_nnz), dtype=bool)
    keep_genes = np.ones(len(statistics.gene_nnz), dtype=bool)
    if zero_cells == "drop":
        keep_cells &= statistics.cell_nnz > 0
    if duplicate_cells == "drop":
        keep_cells &= ~statistics.repeats
    if zero_genes == "drop":
        keep_genes &= statistics.gene_nnz > 0
    if not keep_cells.any():
        raise InputError("config", "load.zero_cells", "every cell has zero counts", "check that X holds the counts")
    if not keep_genes.any():
        raise InputError("config", "load.zero_genes", "every gene has zero counts", "check that X holds the counts")
    return keep_cells, keep_genes


def apply_qc_actions(adata: ad.AnnData, zero_cells="drop", zero_genes="keep", duplicate_cells="keep") -> ad.AnnData:
    """Drop all-zero cells, all-zero genes or repeated cells as configured; duplicates keep their first occurrence."""
    keep_cells, keep_genes = qc_masks(count_statistics([adata.X], adata.n_vars), zero_cells, zero_genes,
                                      duplicate_cells)
    return _materialise(adata, keep_cells, keep_genes)


def loaded_annotations(obs: pd.DataFrame, var: pd.DataFrame, statistics: CountStatistics, keep_cells: np.ndarray,
                       keep_genes: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The kept cells' obs with ``total_counts``, each one's total over all genes (its sequencing depth), and
    the kept genes' var with ``total_counts`` and ``n_cells_expressed`` over the kept cells: what the slice
    needs of the counts when it keeps every cell. The dropped cells are all-zero cells, which add nothing to
    a gene, and, where repeats are dropped, every repeat."""
    kept = ad.AnnData(obs=obs, var=var)[keep_cells, keep_genes].copy()
    kept.obs["total_counts"] = statistics.cell_totals[keep_cells]
    repeats_dropped = not keep_cells[statistics.repeats & (statistics.cell_nnz > 0)].any()
    totals = statistics.gene_totals - (statistics.repeat_gene_totals if repeats_dropped else 0)
    expressing = statistics.gene_nnz - (statistics.repeat_gene_nnz if repeats_dropped else 0)
    kept.var["total_counts"] = totals[keep_genes]
    kept.var["n_cells_expressed"] = expressing[keep_genes]
    return kept.obs, kept.var


def gene_counts(counts, var_names) -> pd.DataFrame:
    """Each gene's total count and number of cells expressing it, over the fitted cells: the slice
    records them in the selection's var, so that the per-gene table needs no second read of the counts."""
    counts = as_csr(counts)
    n_genes = counts.shape[1]
    totals = _gene_totals(counts.indices, counts.data, n_genes)
    expressing = np.bincount(counts.indices[counts.data > 0], minlength=n_genes)
    return pd.DataFrame({"total_counts": totals,
                         "n_cells_expressed": expressing.astype(np.int64)}, index=pd.Index(var_names, name="gene"))


def cells_passing(obs: pd.DataFrame, obs_filters, source="slice") -> np.ndarray:
    """Positions of the cells whose obs values pass every filter of ``obs_filters`` (column ->
    allowed values), in order; a missing column, or a filter that keeps no cell, is an InputError."""
    cell_index = np.arange(len(obs))
    for column, allowed in (obs_filters or {}).items():
        if column not in obs.columns:
            raise InputError(
                "config", f"{source}.obs_filters.{column}",
                f"obs has no column {column!r} (available: {list(obs.columns)})",
                "use one of the available columns or remove the filter",
            )
        allowed = list(allowed) if isinstance(allowed, (list, tuple, set)) else [allowed]
        passes = obs[column].iloc[cell_index].isin(allowed).to_numpy()
        if not passes.any():
            earlier = " among the cells kept by the earlier filters" if len(cell_index) < len(obs) else ""
            raise InputError(
                "config", f"{source}.obs_filters.{column}", f"no cell has one of the values {allowed}{earlier}",
                f"use values present in obs[{column!r}], e.g. {list(pd.unique(obs[column]))[:5]}",
            )
        cell_index = cell_index[passes]
    return cell_index


def slice_counts(
    adata: ad.AnnData,
    *,
    cells_method="all",
    n_cells=None,
    genes_method="all",
    n_genes=None,
    obs_filters=None,
    drop_zero_cells=False,
    drop_zero_genes=False,
    seed=0,
    source="slice",
) -> ad.AnnData:
    """Select the cells and genes to fit, reproducibly, without changing the input.

    Order: obs filters, then cells, then genes (HVG is computed on the selected cells),
    then all-zero cells/genes of the result. `source` is the config key prefix used in errors.
    """
    selection = _select(adata.obs, adata.n_vars, lambda rows: [as_csr(adata.X)[rows]], cells_method=cells_method,
                        n_cells=n_cells, genes_method=genes_method, n_genes=n_genes, obs_filters=obs_filters,
                        drop_zero_cells=drop_zero_cells, drop_zero_genes=drop_zero_genes, seed=seed, source=source,
                        gene_statistics=False)
    return _materialise(adata, selection.cells, selection.genes)


def slice_loaded(
    loaded: ad.AnnData,
    read_rows,
    *,
    cells_method="all",
    n_cells=None,
    genes_method="all",
    n_genes=None,
    obs_filters=None,
    drop_zero_cells=False,
    drop_zero_genes=False,
    seed=0,
    source="slice",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``slice_counts`` of the cells and genes that load kept (loaded.h5ad, without counts: obs with
    ``total_counts``, var with ``total_counts`` and ``n_cells_expressed``): the selection's obs, and its var
    with the genes' totals over the selected cells.

    ``read_rows(positions)`` gives the counts of those loaded cells (increasing positions) in the loaded
    genes, as CSR blocks of cells, in order. Only what needs the counts reads them, one block at a time:
    ``drop_zero_cells``, ``drop_zero_genes`` and the genes' totals over some of the cells.
    ``genes_method: hvg`` holds the selected cells' counts at once, the one path whose memory grows with
    the cells. With every cell and gene, nothing is read.
    """
    selection = _select(loaded.obs, loaded.n_vars, read_rows, cells_method=cells_method, n_cells=n_cells,
                        genes_method=genes_method, n_genes=n_genes, obs_filters=obs_filters,
                        drop_zero_cells=drop_zero_cells, drop_zero_genes=drop_zero_genes, seed=seed, source=source,
                        gene_statistics=True)
    chosen = ad.AnnData(obs=loaded.obs, var=loaded.var)[selection.cells, selection.genes].copy()
    if selection.gene_table is not None:
        for column, values in selection.gene_table.items():
            chosen.var[column] = values.to_numpy()
    return chosen.obs, chosen.var


class _Selection(NamedTuple):
    cells: np.ndarray  # positions, increasing
    genes: np.ndarray
    gene_table: pd.DataFrame | None  # gene_counts of the selected genes over the selected cells, when read


def _select(obs, n_available_genes, read_rows, *, cells_method, n_cells, genes_method, n_genes, obs_filters,
            drop_zero_cells, drop_zero_genes, seed, source, gene_statistics) -> _Selection:
    """The cells and genes of ``slice_counts``, reading counts through ``read_rows`` only where a step needs
    them; ``gene_statistics``: the genes' totals are wanted when the cells are not all of them."""
    cell_index = cells_passing(obs, obs_filters, source)
    cell_index = cell_index[_choose(len(cell_index), cells_method, n_cells, CELL_METHODS,
                                    np.random.default_rng(seed), f"{source}.cells")]
    held = None  # the selected cells' counts, when a step needed them all at once
    if genes_method == "hvg":
        gene_index, held = _highly_variable_gene_index(n_available_genes, read_rows, cell_index, n_genes,
                                                       f"{source}.genes")
    else:
        gene_index = _choose(n_available_genes, genes_method, n_genes, GENE_METHODS,
                             np.random.default_rng([seed, 1]), f"{source}.genes")

    if not (drop_zero_cells or drop_zero_genes or (gene_statistics and len(cell_index) < len(obs))):
        return _Selection(cell_index, gene_index, None)
    every_gene = len(gene_index) == n_available_genes
    cell_nnz, gene_nnz = [], np.zeros(len(gene_index), dtype=np.int64)
    totals = np.zeros(len(gene_index), dtype=np.int64)
    for block in [held] if held is not None else read_rows(cell_index):
        counts = as_csr(block) if every_gene else as_csr(block)[:, gene_index]
        nonzero = counts.data != 0
        cell_nnz.append(np.diff(np.r_[0, np.cumsum(nonzero)][counts.indptr]))
        gene_nnz += np.bincount(counts.indices[nonzero], minlength=len(gene_index))
        totals += _gene_totals(counts.indices, counts.data, len(gene_index))
    if drop_zero_cells:
        nonzero_cells = np.concatenate(cell_nnz) > 0
        if not nonzero_cells.any():
            raise InputError("config", f"{source}.drop_zero_cells", "every selected cell is zero in the selected genes",
                             "select other cells or genes, or set it to false")
        cell_index = cell_index[nonzero_cells]
    # Cells without counts in the selected genes add nothing to them: the totals hold over the cells kept.
    gene_table = pd.DataFrame({"total_counts": totals, "n_cells_expressed": gene_nnz})
    if drop_zero_genes:
        nonzero_genes = gene_nnz > 0
        if not nonzero_genes.any():
            raise InputError("config", f"{source}.drop_zero_genes", "every gene is zero in the selected cells",
                             "select other cells or genes, or set it to false")
        gene_index, gene_table = gene_index[nonzero_genes], gene_table[nonzero_genes]
    return _Selection(cell_index, gene_index, gene_table)


def _canonical_csr(matrix) -> sp.csr_matrix:
    """CSR with sorted, unique indices and no stored zeros, so rows can be compared by their bytes."""
    counts = as_csr(matrix)
    if counts.has_canonical_format and not (counts.data == 0).any():
        return counts
    counts = counts.copy()
    counts.sum_duplicates()
    counts.eliminate_zeros()
    return counts


def _repeated_rows(counts: sp.csr_matrix, seen: set) -> np.ndarray:
    """True for each row whose counts equal those of a row before it, in this block or in one whose row
    digests ``seen`` holds (all-zero rows repeat each other); the block's digests are added to ``seen``.
    Integer counts are digested as int32 where a row's fit, else as int64: blocks of one file are stored in
    either type, and a row must digest alike in both."""
    indices = counts.indices.astype(np.int64 if counts.shape[1] > INT32_MAX else np.int32, copy=False)
    values, wide_values = counts.data, counts.data
    wide_rows = np.zeros(counts.shape[0], dtype=bool)
    if np.issubdtype(values.dtype, np.integer) and values.dtype != np.int32:
        wide_values = values.astype(np.int64, copy=False)
        wide = (values > INT32_MAX) | (values < -INT32_MAX - 1)
        wide_rows[np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))[wide]] = True
        values = values.astype(np.int32)  # the wide rows' values wrap here: they are digested from wide_values
    repeated = np.zeros(counts.shape[0], dtype=bool)
    for row, (start, end) in enumerate(zip(counts.indptr[:-1].tolist(), counts.indptr[1:].tolist())):
        digest = hashlib.blake2b(indices[start:end].tobytes(), digest_size=16)
        digest.update((wide_values if wide_rows[row] else values)[start:end].tobytes())
        key = digest.digest()
        repeated[row] = key in seen
        seen.add(key)
    return repeated


def _as_int64(sums: np.ndarray) -> np.ndarray:
    """Sums of counts as int64, whether the counts were stored as integers or as floats."""
    return (np.rint(sums) if np.issubdtype(sums.dtype, np.floating) else sums).astype(np.int64)


def _gene_totals(indices: np.ndarray, values: np.ndarray, n_genes: int) -> np.ndarray:
    """Each gene's sum of the given entries, with no transposed copy of an atlas's counts."""
    return np.rint(np.bincount(indices, weights=values.astype(np.float64), minlength=n_genes)).astype(np.int64)


def _choose(n_available, method, n, methods, rng, field) -> np.ndarray:
    """Positions (sorted) of the first or a seeded random n of `n_available` items; n None or too big means all."""
    if method not in methods:
        raise InputError("config", f"{field}.method", f"unknown method {method!r}", f"use one of {list(methods)}")
    n_wanted = _requested_size(n_available, n, f"{field}.n")
    if method == "all" and n is not None:
        # Silently keeping everything would fit far more data than asked for.
        items = field.rsplit(".", 1)[-1]
        others = [m for m in methods if m != "all"]
        raise InputError("config", f"{field}.n", f"n={n} is set but method is 'all', which keeps every {items[:-1]}",
                         f"set {field}.method to {', '.join(others[:-1])} or {others[-1]}, or remove n")
    if method == "all" or n_wanted == n_available:
        return np.arange(n_available)
    if method == "first":
        return np.arange(n_wanted)
    return np.sort(rng.choice(n_available, size=n_wanted, replace=False))


def _requested_size(n_available, n, field) -> int:
    """Validate a requested count and cap it at what is available."""
    if n is None:
        return n_available
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise InputError("config", field, f"{n!r} is not a positive integer", "give a whole number >= 1, or null for all")
    return min(int(n), n_available)


def _highly_variable_gene_index(n_available, read_rows, cell_index, n_genes, field):
    """Positions (in original order) of the n most variable genes by Seurat v3, which models raw counts, and
    the selected cells' counts when they had to be read (all of them at once) to rank the genes."""
    import scanpy as sc

    n_wanted = _requested_size(n_available, n_genes, f"{field}.n")
    if n_wanted == n_available:
        return np.arange(n_available), None
    if len(cell_index) < 2:
        raise InputError("config", f"{field}.method", "hvg needs at least 2 selected cells",
                         "select more cells or use genes.method: first or random")
    counts = sp.vstack([as_csr(block) for block in read_rows(cell_index)], format="csr")
    selected = ad.AnnData(X=counts.astype(np.float64))
    # Seurat v3 fits a loess (span 0.3, degree 2) to the genes that vary: with fewer than 10 of them a
    # neighbourhood holds under 3 genes, and the fit fails or crashes the process.
    varying = int(np.count_nonzero(selected.X.max(axis=0).toarray() != selected.X.min(axis=0).toarray()))
    if varying < HVG_MIN_VARYING_GENES:
        raise InputError("config", f"{field}.method", f"hvg needs at least {HVG_MIN_VARYING_GENES} genes that vary "
                         f"among the selected cells, found {varying}", "select more cells or genes, or use "
                         "genes.method: first or random")
    try:
        ranking = sc.pp.highly_variable_genes(selected, flavor="seurat_v3", n_top_genes=n_wanted, inplace=False)
    except ValueError as error:  # the loess fit failing on degenerate means and variances
        raise InputError("config", f"{field}.method", f"hvg could not rank the genes ({error})",
                         "select more cells or genes, or use genes.method: first or random") from error
    return np.flatnonzero(ranking["highly_variable"].to_numpy()), counts


def _materialise(adata, cell_selector, gene_selector) -> ad.AnnData:
    """An independent AnnData of the selection, with CSR counts. The annotations are subset by anndata
    (unused categories dropped, as always); the counts by rows, then by columns only if a gene is left
    out: anndata's indexing of both at once took 4 s on an atlas that kept every gene."""
    annotations = ad.AnnData(obs=adata.obs, var=adata.var, uns=adata.uns)[cell_selector, gene_selector].copy()
    rows = np.arange(adata.n_obs)[cell_selector]
    columns = np.arange(adata.n_vars)[gene_selector]
    counts = as_csr(adata.X)
    if not np.array_equal(rows, np.arange(adata.n_obs)):
        counts = counts[rows]
    if not np.array_equal(columns, np.arange(adata.n_vars)):
        counts = counts[:, columns]
    annotations.X = as_csr(counts.copy() if counts is adata.X else counts)
    return annotations
