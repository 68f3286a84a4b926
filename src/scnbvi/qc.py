"""What to keep of the counts: the QC report of all-zero and repeated cells, the actions that drop them,
and the slicing of cells and genes to fit."""

import hashlib
import numbers

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scnbvi.data import as_csr, read_counts
from scnbvi.errors import InputError

QC_ACTIONS = ("keep", "drop")
CELL_METHODS = ("all", "first", "random")
GENE_METHODS = ("all", "first", "random", "hvg")
HVG_MIN_VARYING_GENES = 10


def qc_report(adata: ad.AnnData) -> dict:
    """Count the cells and genes that a user may want to drop before fitting."""
    counts = _canonical_csr(adata.X)
    return {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "nnz": int(counts.nnz),
        "all_zero_cells": int(np.sum(np.diff(counts.indptr) == 0)),
        "all_zero_genes": int(np.sum(np.bincount(counts.indices, minlength=adata.n_vars) == 0)),
        "duplicate_cells": int(_duplicate_cell_mask(counts).sum()),
    }


def apply_qc_actions(adata: ad.AnnData, zero_cells="drop", zero_genes="keep", duplicate_cells="keep") -> ad.AnnData:
    """Drop all-zero cells, all-zero genes or repeated cells as configured; duplicates keep their first occurrence."""
    actions = {"zero_cells": zero_cells, "zero_genes": zero_genes, "duplicate_cells": duplicate_cells}
    for name, action in actions.items():
        if action not in QC_ACTIONS:
            raise InputError("config", f"load.{name}", f"unknown action {action!r}", "use 'keep' or 'drop'")
    counts = _canonical_csr(adata.X)
    keep_cells = np.ones(adata.n_obs, dtype=bool)
    keep_genes = np.ones(adata.n_vars, dtype=bool)
    if zero_cells == "drop":
        keep_cells &= np.diff(counts.indptr) > 0
    if duplicate_cells == "drop":
        keep_cells &= ~_duplicate_cell_mask(counts)
    if zero_genes == "drop":
        keep_genes &= np.bincount(counts.indices, minlength=adata.n_vars) > 0
    if not keep_cells.any():
        raise InputError("config", "load.zero_cells", "every cell has zero counts", "check that X holds the counts")
    if not keep_genes.any():
        raise InputError("config", "load.zero_genes", "every gene has zero counts", "check that X holds the counts")
    return _materialise(adata, keep_cells, keep_genes)


def loaded_counts(path, load_settings: dict) -> ad.AnnData:
    """The counts the load rule keeps: the input read with its settings, then its QC actions applied.
    The slice rule reads them so again rather than from a copy that load would write."""
    actions = dict(load_settings)
    reading = {key: actions.pop(key) for key in ("duplicate_names", "layer", "gene_symbols")}
    return apply_qc_actions(read_counts(path, **reading), **actions)


def gene_counts(counts, var_names) -> pd.DataFrame:
    """Each gene's total count and number of cells expressing it, over the fitted cells: the slice
    records them in the selection's var, so that the per-gene table needs no second read of the counts."""
    counts = as_csr(counts)
    n_genes = counts.shape[1]
    # Sums over the entries by gene, with no transposed copy of an atlas's counts.
    totals = np.bincount(counts.indices, weights=counts.data.astype(np.float64), minlength=n_genes)
    expressing = np.bincount(counts.indices[counts.data > 0], minlength=n_genes)
    return pd.DataFrame({"total_counts": np.rint(totals).astype(np.int64),
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
    cell_index = cells_passing(adata.obs, obs_filters, source)

    cell_index = cell_index[_choose(len(cell_index), cells_method, n_cells, CELL_METHODS,
                                    np.random.default_rng(seed), f"{source}.cells")]
    gene_rng = np.random.default_rng([seed, 1])
    if genes_method == "hvg":
        gene_index = _highly_variable_gene_index(adata, cell_index, n_genes, f"{source}.genes")
    else:
        gene_index = _choose(adata.n_vars, genes_method, n_genes, GENE_METHODS, gene_rng, f"{source}.genes")

    if drop_zero_cells or drop_zero_genes:
        counts = as_csr(adata.X)[cell_index][:, gene_index]
    if drop_zero_cells:
        nonzero_cells = np.asarray((counts != 0).sum(axis=1)).ravel() > 0
        if not nonzero_cells.any():
            raise InputError("config", f"{source}.drop_zero_cells", "every selected cell is zero in the selected genes",
                             "select other cells or genes, or set it to false")
        cell_index = cell_index[nonzero_cells]
    if drop_zero_genes:
        nonzero_genes = np.asarray((counts != 0).sum(axis=0)).ravel() > 0
        if not nonzero_genes.any():
            raise InputError("config", f"{source}.drop_zero_genes", "every gene is zero in the selected cells",
                             "select other cells or genes, or set it to false")
        gene_index = gene_index[nonzero_genes]
    return _materialise(adata, cell_index, gene_index)


def _canonical_csr(matrix) -> sp.csr_matrix:
    """CSR with sorted, unique indices and no stored zeros, so rows can be compared by their bytes."""
    counts = as_csr(matrix)
    if counts.has_canonical_format and not (counts.data == 0).any():
        return counts
    counts = counts.copy()
    counts.sum_duplicates()
    counts.eliminate_zeros()
    return counts


def _duplicate_cell_mask(counts: sp.csr_matrix) -> np.ndarray:
    """True for each cell whose counts equal those of an earlier cell (all-zero cells repeat each other)."""
    seen = set()
    duplicate = np.zeros(counts.shape[0], dtype=bool)
    for row, (start, end) in enumerate(zip(counts.indptr[:-1], counts.indptr[1:])):
        digest = hashlib.blake2b(counts.indices[start:end].tobytes(), digest_size=16)
        digest.update(counts.data[start:end].tobytes())
        key = digest.digest()
        duplicate[row] = key in seen
        seen.add(key)
    return duplicate


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


def _highly_variable_gene_index(adata, cell_index, n_genes, field) -> np.ndarray:
    """Positions (in original order) of the n most variable genes by Seurat v3, which models raw counts."""
    import scanpy as sc

    n_wanted = _requested_size(adata.n_vars, n_genes, f"{field}.n")
    if n_wanted == adata.n_vars:
        return np.arange(adata.n_vars)
    if len(cell_index) < 2:
        raise InputError("config", f"{field}.method", "hvg needs at least 2 selected cells",
                         "select more cells or use genes.method: first or random")
    selected = ad.AnnData(X=as_csr(adata.X)[cell_index].astype(np.float64))
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
    return np.flatnonzero(ranking["highly_variable"].to_numpy())


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
