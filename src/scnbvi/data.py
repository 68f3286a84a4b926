"""Read and check single-cell count matrices (cells x genes) into the checked integer CSR every later step
expects; the QC of the cells and genes and their slicing live in :mod:`scnbvi.qc`."""

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import read_elem, sparse_dataset
from anndata.utils import make_index_unique

from scnbvi.errors import InputError
from scnbvi.outputs import atomic_output

RAW_COUNTS_FIX = ("pass raw counts, not normalised or scaled data (counts kept in a layer or in adata.raw: "
                  "set load.layer to it)")
DUPLICATE_NAME_ACTIONS = ("make_unique", "error")
RENAMED_RECORD_LIMIT = 1000  # renamed entries listed per axis in qc.json; the count covers them all
RAW_LAYER = "raw"  # load.layer's name for adata.raw.X
SELECTION_KEY = "scnbvi_selection"  # uns entry of a selection file: the dtype of its counts
MIN_MEAN_RUN = 8  # consecutive rows per slice, on average, below which rows are read one by one
SPAN_GAP_ROWS = 16  # rows between two wanted runs of a CSR matrix below which both are read as one span
CANDIDATE_ENTRIES = 1_000_000  # entries read from each other matrix when looking for the counts
SPARSE_ENCODINGS = ("csr_matrix", "csc_matrix")
YAML_WORDS = {"null", "true", "false", "yes", "no", "on", "off", "y", "n"}  # read back as no string


def read_counts(path, block_entries: int = 50_000_000, duplicate_names: str = "make_unique",
                layer: str | None = None, gene_symbols: str | None = None) -> ad.AnnData:
    """Load an .h5ad file or AnnData zarr store as checked integer counts in CSR, with unique cell and gene names.

    See ``read_counts_with_renames``, which also says which names were changed.
    """
    return read_counts_with_renames(path, block_entries, duplicate_names, layer, gene_symbols)[0]


def read_counts_with_renames(path, block_entries: int = 50_000_000, duplicate_names: str = "make_unique",
                             layer: str | None = None, gene_symbols: str | None = None) -> tuple[ad.AnnData, dict]:
    """Load an .h5ad or .zarr input as checked integer counts in CSR, the layout every later step expects: the blocks of
    ``checked_count_blocks`` stacked, in the largest integer type any of them needs, so that a file whose
    matrix would not fit in memory as stored (dense, or float64 values with int64 indices) loads as long
    as its non-zero counts fit. The second value is ``CountBlocks.renamed``, the names made unique."""
    with checked_count_blocks(path, block_entries, duplicate_names, layer, gene_symbols) as counts:
        blocks = list(counts.blocks)
    dtype = max((block.dtype for block in blocks), key=lambda d: d.itemsize)
    stacked = sp.vstack([block.astype(dtype, copy=False) for block in blocks], format="csr")
    return ad.AnnData(X=stacked, obs=counts.obs, var=counts.var, uns=counts.uns), counts.renamed


class CountBlocks(NamedTuple):
    """The annotations of an input and its checked counts, one block of cells at a time, in order."""

    obs: pd.DataFrame
    var: pd.DataFrame
    uns: dict
    renamed: dict
    blocks: Iterator[sp.csr_matrix]


@contextmanager
def checked_count_blocks(path, block_entries: int = 50_000_000, duplicate_names: str = "make_unique",
                         layer: str | None = None, gene_symbols: str | None = None) -> Iterator[CountBlocks]:
    """The input's annotations and its counts as checked integer CSR blocks of cells, read while the file is open.

    ``layer`` names the matrix holding the counts: None for X, a key of ``adata.layers``, or
    ``raw`` for ``adata.raw.X`` with ``adata.raw.var`` as genes (scanpy and CELLxGENE files keep
    the counts there and normalised values in X). When the matrix holds no counts but another one
    of the file does, the error names the config line that reads it. ``gene_symbols`` names the var
    column (of ``adata.raw.var`` with ``raw``) holding the genes' symbols: checked here, so that a
    wrong name stops the run before the fit, and kept in var for the tables that show it (see
    ``symbols_from_var``).

    Repeated obs or var names (a gene symbol listed twice is common, and its counts are still
    valid) break the posterior's coordinates much later, so they are handled here, before the
    counts are read: ``make_unique`` suffixes repeats as anndata's ``var_names_make_unique``
    does (-1, -2, ...), ``error`` stops. ``renamed`` records them for qc.json: per axis, the
    count and original -> new names of at most RENAMED_RECORD_LIMIT renamed entries.

    Each block (``block_entries`` dense entries or stored values) is read from disk, checked and
    shrunk to int32 CSR (int64 where a count needs it) when the iteration reaches it: a caller that
    keeps statistics of the blocks rather than the blocks handles a matrix that would not fit in
    memory. The input is opened with h5py or zarr (:func:`input_store`), not anndata's backed mode, which
    would load every layer and obsm into memory.
    """
    if duplicate_names not in DUPLICATE_NAME_ACTIONS:
        raise InputError("config", "load.duplicate_names", f"unknown action {duplicate_names!r}",
                         f"use one of {list(DUPLICATE_NAME_ACTIONS)}")
    path = Path(path)
    with input_store(path) as file:
        matrix, field = _stored_matrix(file, layer, path)
        obs = _read_element(file, "obs", path)
        var = _read_element(file, "raw/var" if layer == RAW_LAYER else "var", path)
        uns = _read_element(file, "uns", path) if "uns" in file else {}
        _require_symbol_column(var, gene_symbols, layer, path)
        if matrix.shape != (len(obs), len(var)):
            raise InputError(path, field, f"shape {matrix.shape} differs from obs x var ({len(obs)} x {len(var)})",
                             f"write the input again with anndata's {_rewrite_fix(file)}")
        _require_cells_and_genes(*matrix.shape, path, field)
        renamed = {}
        for axis, frame in (("obs", obs), ("var", var)):
            frame.index, renamed[axis] = _unique_names(frame.index, axis, duplicate_names, path)

        def blocks():
            try:
                for start, size in _cell_blocks(matrix, block_entries):
                    yield _checked_block(matrix[start : start + size], obs.index[start : start + size], var.index,
                                         path, field)
            except InputError as error:
                fix = _counts_elsewhere(file, field, block_entries, path)
                if fix is None:
                    raise
                raise InputError(error.source, error.field, error.problem, fix) from None

        yield CountBlocks(obs, var, uns, renamed, blocks())


def write_selection(adata: ad.AnnData, path) -> None:
    """Write the cells and genes of ``adata`` (its obs and var) and its counts' dtype, but not its counts:
    the later rules read those from the input through it (``read_selected_counts``), so that results/
    holds no second copy of them. ``obs["total_counts"]``, each cell's total over all genes, is needed:
    it tells the reader that a cell's counts in the input changed."""
    write_annotations(adata.obs, adata.var, adata.X.dtype, path)


def write_annotations(obs: pd.DataFrame, var: pd.DataFrame, dtype, path, strings_to_categoricals: bool = True) -> None:
    """The file ``write_selection`` writes, from cells and genes chosen without their counts in memory.
    ``strings_to_categoricals=False`` keeps text columns as text (anndata stores one with repeated values
    as categorical): for a file that a selection is made from, so that the selection's own file is
    written as if from the input."""
    selection = ad.AnnData(obs=obs, var=var, uns={SELECTION_KEY: {"dtype": str(np.dtype(dtype))}})
    with atomic_output(path) as temporary_path:
        selection.write_h5ad(temporary_path, convert_strings_to_categoricals=strings_to_categoricals)


def read_selected_counts(path, selection_path, duplicate_names: str = "make_unique", layer: str | None = None,
                         block_entries: int = 50_000_000, cells=None) -> ad.AnnData:
    """The selected cells and genes of the input, as ``write_selection`` recorded them: the counts read as
    ``read_counts`` reads them (``layer``, repeated names renamed by ``duplicate_names``, checked and
    canonical CSR, in the recorded dtype), obs and var from the selection, uns from the input.

    Only the selected cells are read (of them only ``cells``, in that order, when given), a block at a
    time. A selected cell or gene missing from the input, or a selected cell whose total over all genes
    (``obs["total_counts"]``) is no longer what it was, means the input changed after the selection was
    made: an InputError, rather than counts that do not belong to the selection.
    """
    with SelectedCounts(path, selection_path, duplicate_names, layer) as reader:
        return reader.anndata(block_entries, cells)


class SelectedCounts:
    """The input opened and read through its selection (see ``read_selected_counts``), cells by their
    positions in the selection: what the fit streams when the selected counts are too many to hold."""

    def __init__(self, path, selection_path, duplicate_names: str = "make_unique", layer: str | None = None):
        self.selection, self.selection_path = ad.read_h5ad(selection_path), selection_path
        self.path = Path(path)
        self._fix = (f"the input changed after {selection_path} was written from it; rerun the workflow with "
                     "--forcerun load, so that its cells and genes are selected again")
        self._file = _open_input(self.path)
        try:
            self._matrix, self._field = _stored_matrix(self._file, layer, self.path)
            names = {}
            for axis, key in (("obs", "obs"), ("var", "raw/var" if layer == RAW_LAYER else "var")):
                names[axis] = _unique_names(_read_element(self._file, key, self.path).index, axis, duplicate_names,
                                            self.path)[0]
            self._cell_names, self._gene_names = names["obs"], names["var"]
            self._rows = _selected_positions(names["obs"], self.selection.obs_names, "obs_names", "cells", self.path,
                                             self._fix)
            self._genes = _selected_positions(names["var"], self.selection.var_names, "var_names", "genes",
                                              self.path, self._fix)
            self.uns = _read_element(self._file, "uns", self.path) if "uns" in self._file else {}
        except BaseException:
            _close_input(self._file)
            raise
        self._every_gene = np.array_equal(self._genes, np.arange(len(self._gene_names)))
        self.dtype = np.dtype(self.selection.uns[SELECTION_KEY]["dtype"])
        self._totals = self.selection.obs["total_counts"].to_numpy()
        self.shape = (self.selection.n_obs, self.selection.n_vars)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self) -> None:
        _close_input(self._file)

    def anndata(self, block_entries: int = 50_000_000, cells=None) -> ad.AnnData:
        """The counts of the selection's cells (of ``cells`` only, in that order, when given) with their
        obs and var, the input's uns, read a block at a time."""
        selection = self.selection
        positions = np.arange(self.shape[0])
        if cells is not None:
            wanted = pd.Index([str(cell) for cell in cells])
            positions = _selected_positions(selection.obs_names, wanted, "obs_names", "cells", self.selection_path,
                                            "ask only for cells of the selection", among="the selection")
            selection = selection[wanted].copy()
        order = np.argsort(positions, kind="stable")
        counts = sp.vstack(list(self.blocks(block_entries, positions[order])), format="csr")
        if (order != np.arange(len(order))).any():
            counts = counts[np.argsort(order)]
        return ad.AnnData(X=counts, obs=selection.obs, var=selection.var, uns=self.uns)

    def blocks(self, block_entries: int = 50_000_000, cells: np.ndarray | None = None):
        """The counts of ``cells`` (increasing positions; every selected cell by default), in order, a
        block of about ``block_entries`` stored values of the input at a time."""
        cells = np.arange(self.shape[0]) if cells is None else np.asarray(cells)
        _, size = _cell_blocks(self._matrix, block_entries)[0]
        for start in range(0, len(cells), size):
            yield self.read(cells[start:start + size])

    def read(self, cells: np.ndarray) -> sp.csr_matrix:
        """The counts of the selection's ``cells`` (increasing positions), checked and canonical, in the
        selected genes and the recorded dtype; an InputError if a cell's total is not what it was."""
        rows = self._rows[cells]
        # Files are read in increasing rows; the input may list the selected cells in another order.
        order = np.argsort(rows, kind="stable")
        block = _checked_block(_read_rows(self._matrix, rows[order]), self._cell_names[rows[order]],
                               self._gene_names, self.path, self._field)
        if np.any(np.diff(order) != 1):
            block = block[np.argsort(order)]
        totals = np.asarray(block.sum(axis=1, dtype=np.int64)).ravel()
        changed = np.flatnonzero(totals != self._totals[cells])
        if len(changed):
            first = cells[changed[0]]
            raise InputError(self.path, self._field, f"{len(changed)} selected cells have other counts than when they "
                             f"were selected (first: {self.selection.obs_names[first]!r}, total "
                             f"{totals[changed[0]]}, was {self._totals[first]})", self._fix)
        if not self._every_gene:
            block = block[:, self._genes]
            block.sort_indices()  # genes listed in another order than the input's
        return block.astype(self.dtype, copy=False)


def _read_rows(matrix, rows: np.ndarray):
    """Rows (increasing positions) of a matrix on disk. A CSR matrix is read by spans of rows
    (:func:`_read_csr_spans`): runs of consecutive rows, joined where fewer than ``SPAN_GAP_ROWS``
    rows lie between them, whose rows are then picked (scattered rows, as the closing sweep's later
    passes ask for, cost a read each otherwise). Other layouts by their runs as slices when the runs
    are long, as when most cells are kept, else row by row."""
    if isinstance(matrix, ad.abc.CSRDataset):
        if not len(rows):
            return sp.csr_matrix((0, matrix.shape[1]), dtype=matrix.dtype)
        breaks = np.flatnonzero(np.diff(rows) > SPAN_GAP_ROWS) + 1
        spans = [(int(span[0]), int(span[-1]) + 1) for span in np.split(rows, breaks)]
        read = _read_csr_spans(matrix.group, spans, matrix.shape[1])
        if read.shape[0] == len(rows):
            return read
        lengths = np.array([end - start for start, end in spans])
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) - [start for start, _ in spans]
        return read[rows + np.repeat(offsets, np.diff(np.r_[0, breaks, len(rows)]))]
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    if len(runs) * MIN_MEAN_RUN > len(rows):
        return matrix[rows]
    return sp.vstack([as_csr(matrix[run[0] : run[-1] + 1]) for run in runs], format="csr")


def _read_csr_spans(group, spans: list[tuple[int, int]], n_columns: int) -> sp.csr_matrix:
    """The rows of spans [start, end) of a CSR matrix stored as an h5py or zarr group (data, indices,
    indptr), straight from its arrays: one read of each per span, where anndata's row slicing costs a
    few milliseconds a call (a window of the fit's shuffle is a thousand spans)."""
    bounds = [group["indptr"][start : end + 1] for start, end in spans]
    data, indices = group["data"], group["indices"]
    values = [data[int(b[0]) : int(b[-1])] for b in bounds] or [np.zeros(0, data.dtype)]
    columns = [indices[int(b[0]) : int(b[-1])] for b in bounds] or [np.zeros(0, indices.dtype)]
    row_nnz = [np.diff(b) for b in bounds] or [np.zeros(0, np.int64)]
    if len(bounds) > 1:  # one span, as when every cell is read, needs no copy
        values, columns, row_nnz = ([np.concatenate(parts)] for parts in (values, columns, row_nnz))
    indptr = np.concatenate([[0], np.cumsum(row_nnz[0])])
    return sp.csr_matrix((values[0], columns[0], indptr), shape=(len(row_nnz[0]), n_columns))


def _selected_positions(names: pd.Index, selected: pd.Index, field, items, source, fix,
                        among="the input") -> np.ndarray:
    """Where each selected name lies among ``names``; a missing one is an InputError."""
    positions = names.get_indexer(selected)
    missing = positions < 0
    if missing.any():
        raise InputError(source, field, f"{int(missing.sum())} of the {len(selected)} selected {items} are not in "
                         f"{among} (first: {selected[missing][0]!r})", fix)
    return positions


@contextmanager
def input_store(path) -> Iterator[h5py.File | zarr.Group]:
    """The input opened for reading (see ``_open_input``), closed when the block ends."""
    store = _open_input(Path(path))
    try:
        yield store
    finally:
        _close_input(store)


def _open_input(path: Path) -> h5py.File | zarr.Group:
    """An .h5ad file as an h5py file, a directory as the root group of an AnnData zarr store: anndata reads
    the elements of either (read_elem, sparse_dataset) and their arrays slice alike, so every reader takes
    both. An InputError says why the input cannot be opened."""
    if not path.exists():
        if path.suffix == ".zarr":
            raise InputError(path, "file", "zarr store not found",
                             "check the path, or write the store (anndata's AnnData.write_zarr) before running")
        raise InputError(path, "file", "file not found", "check the path, or create the file before running")
    if path.is_dir():
        return _open_zarr(path)
    if path.suffix == ".zarr":
        raise InputError(path, "file", "is a file, not the directory of a zarr store",
                         "give the directory that anndata's AnnData.write_zarr wrote, or an .h5ad file")
    if not path.is_file():
        raise InputError(path, "file", "is not a regular file (a device, pipe or socket)",
                         "give the path of an .h5ad file on disk")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise InputError(path, "file", f"not a readable .h5ad file ({type(error).__name__}: {error})",
                         "write the counts with anndata's AnnData.write_h5ad") from error


def _open_zarr(path: Path) -> zarr.Group:
    """The root group of the AnnData zarr store in directory ``path``."""
    fix = "give an .h5ad file, or the directory of a store written by anndata's AnnData.write_zarr"
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as error:  # zarr raises many types for a directory without (valid) zarr metadata
        raise InputError(path, "file", f"is a directory, not a zarr store ({type(error).__name__}: {error})",
                         fix) from error
    if root.attrs.get("encoding-type") != "anndata":
        _close_input(root)
        raise InputError(path, "file", "is a zarr store but not an AnnData one (its root has no encoding-type "
                         "'anndata')", fix)
    return root


def _close_input(store: h5py.File | zarr.Group) -> None:
    if isinstance(store, h5py.File):
        store.close()
    else:
        store.store.close()


def _rewrite_fix(store) -> str:
    """anndata's writer of the input's format (file, group or array), for the fixes that say to write it again."""
    return "AnnData.write_zarr" if isinstance(store, (zarr.Group, zarr.Array)) else "AnnData.write_h5ad"


def _require_symbol_column(var: pd.DataFrame, column, layer, source) -> None:
    if column is None or column in var.columns:
        return
    frame = "raw.var" if layer == RAW_LAYER else "var"
    raise InputError(source, f"{frame}[{column!r}]", f"no such column (columns: {list(var.columns)})",
                     f"set load.gene_symbols to the {frame} column holding the gene symbols, or remove it")


def symbols_from_var(var: pd.DataFrame, column: str | None) -> pd.Series | None:
    """The symbol of each gene as text, indexed like ``var``, from the column ``load.gene_symbols``
    names (None without it). A gene without a symbol keeps its var name, so that every row reads."""
    if column is None:
        return None
    symbols = var[column].astype(object)
    return symbols.where(symbols.notna(), var.index.to_series(index=var.index)).astype(str).rename("symbol")


def _matrix_key(layer) -> str:
    """Where the matrix named by ``load.layer`` lies in the file."""
    return "X" if layer is None else "raw/X" if layer == RAW_LAYER else f"layers/{layer}"


def _matrix_field(layer) -> str:
    """How errors name the matrix of ``load.layer``."""
    return "X" if layer is None else "raw.X" if layer == RAW_LAYER else f"layers[{layer!r}]"


def _stored_matrix(file: h5py.File | zarr.Group, layer, source):
    """The matrix ``load.layer`` names, as it lies on disk, and the field that names it in errors."""
    field = _matrix_field(layer)
    if layer is None and "X" not in file:
        raise InputError(source, field, f"the file has no X matrix ({_available_matrices(file)})",
                         "store the raw counts in X, or set load.layer to the layer holding them")
    if layer == RAW_LAYER and "raw/X" not in file:
        raise InputError(source, "raw", f"the file has no adata.raw ({_available_matrices(file)})",
                         "set load.layer to one of the layers, or remove it to read X")
    if layer not in (None, RAW_LAYER) and layer not in _layer_names(file):
        raise InputError(source, field, f"no such layer ({_available_matrices(file)})",
                         "set load.layer to one of the layers, raw for adata.raw, or remove it to read X")
    return _on_disk(file[_matrix_key(layer)], field, source), field


def _layer_names(file: h5py.File | zarr.Group) -> list[str]:
    return list(file["layers"].keys()) if isinstance(file.get("layers"), (h5py.Group, zarr.Group)) else []


def _available_matrices(file: h5py.File | zarr.Group) -> str:
    return f"layers: {_layer_names(file)}; adata.raw: {'present' if 'raw/X' in file else 'absent'}"


def _on_disk(element, field, source):
    """A sparse dataset or a dense h5py or zarr array: each reads a block of rows without loading the rest."""
    if isinstance(element, (h5py.Dataset, zarr.Array)) and element.ndim == 2:
        return element
    encoding = element.attrs.get("encoding-type")
    if isinstance(element, (h5py.Group, zarr.Group)) and encoding in SPARSE_ENCODINGS:
        return sparse_dataset(element)
    raise InputError(source, field, f"not a matrix (stored as {encoding or type(element).__name__!r})",
                     f"store the counts as a sparse or dense matrix with anndata's {_rewrite_fix(element)}")


def _read_element(file: h5py.File | zarr.Group, key: str, source):
    try:
        return read_elem(file[key])
    except Exception as error:  # h5py, zarr and anndata raise many types for a missing or outdated element
        raise InputError(source, key, f"not readable ({type(error).__name__}: {error})",
                         f"write the input again with a current anndata's {_rewrite_fix(file)}") from error


def _counts_elsewhere(file: h5py.File | zarr.Group, chosen: str, block_entries: int, source) -> str | None:
    """The fix naming the config line that reads another matrix of the file holding counts, if any.

    Only the first cells of each matrix are read, so the error comes fast on big files. Layers
    named like counts come first; a layer named ``raw`` cannot be chosen (that name reads adata.raw).
    """
    layers = [name for name in _layer_names(file) if name != RAW_LAYER]
    named_counts = [name for name in layers if "count" in name.lower()]
    found = []
    for layer in [*named_counts, RAW_LAYER, None, *(name for name in layers if name not in named_counts)]:
        field = _matrix_field(layer)
        if field == chosen or _matrix_key(layer) not in file:
            continue
        try:
            matrix = _on_disk(file[_matrix_key(layer)], field, source)
            _, size = _cell_blocks(matrix, min(block_entries, CANDIDATE_ENTRIES))[0]
            if _holds_counts(matrix[:size]):
                found.append((layer, field))
        except Exception:  # an unreadable matrix is not where the counts are; the original error stands
            continue
    if not found:
        return None
    (layer, field), others = found[0], [other for _, other in found[1:]]
    where = f"the raw counts are in {field}" + (f" (integers also in {', '.join(others)})" if others else "")
    if layer is None:
        return f"{where}: remove load.layer from this data set's config"
    line = f'"load: {{layer: {_yaml_scalar(layer)}}}"'
    if chosen == "X":
        return f"{where}: add {line} to this data set's config"
    return f"{where}: set {line} in this data set's config"


def _holds_counts(block) -> bool:
    """Whether a block holds some counts and nothing else: real, finite, non-negative integers."""
    values = as_csr(block).data
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        return False
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values) & (values == np.round(values))):
        return False
    return bool(np.count_nonzero(values)) and bool(np.all(values >= 0))


def _yaml_scalar(name: str) -> str:
    """The name as YAML reads it back as the same string: bare when safe, else single-quoted."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) and name.lower() not in YAML_WORDS:
        return name
    return "'" + name.replace("'", "''") + "'"


def _unique_names(names: pd.Index, axis: str, duplicate_names: str, source) -> tuple[pd.Index, dict]:
    """The names with repeats suffixed (or an error), and the record of what was renamed."""
    repeated = names.duplicated()
    if not repeated.any():
        return names, {"count": 0, "names": {}}
    if duplicate_names == "error":
        first = names[repeated][0]
        raise InputError(
            source, f"{axis}_names",
            f"{int(repeated.sum())} repeated names (first: {first!r}, {int((names == first).sum())} times)",
            f"make them unique in the file (adata.{axis}_names_make_unique()) or set load.duplicate_names: make_unique",
        )
    with warnings.catch_warnings():
        # anndata warns when a suffixed name already exists; the record below shows what happened.
        warnings.simplefilter("ignore", UserWarning)
        unique = make_index_unique(names)
    changed = np.flatnonzero(unique != names)
    record = {}
    for position in changed[:RENAMED_RECORD_LIMIT]:
        record.setdefault(str(names[position]), []).append(str(unique[position]))
    return unique, {"count": len(changed), "names": record}


def _cell_blocks(matrix, block_entries: int):
    """(first cell, number of cells) of each block of a matrix on disk."""
    n_cells, n_genes = matrix.shape
    stored = n_genes * n_cells
    if isinstance(matrix, ad.abc.CSRDataset):
        stored = matrix.group["data"].shape[0]
    size = max(1, int(block_entries * n_cells / max(stored, 1)))
    return [(start, size) for start in range(0, n_cells, size)]



def largest_exact_sum(counts: sp.csr_matrix) -> int:
    """The largest sum of a (cell, gene) entry's stored values, in Python's exact integers."""
    coo = counts.tocoo()
    keys = coo.row.astype(np.int64) * counts.shape[1] + coo.col
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], coo.data[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    return max(sum(int(value) for value in values[start:end]) for start, end in zip(starts, ends))

def _checked_block(block, cell_names, gene_names, source, field) -> sp.csr_matrix:
    """One block of cells from disk as validated, canonical counts in the smallest integer type.

    The stored values are checked before repeated (cell, gene) entries are summed: -1 and +3, or
    0.5 and 0.5, would otherwise add up to a valid count and hide a broken file.
    """
    counts = as_csr(block)
    validate_counts(ad.AnnData(X=counts, obs=pd.DataFrame(index=cell_names), var=pd.DataFrame(index=gene_names)),
                    source, field)
    if not counts.has_canonical_format:
        sums = counts.astype(np.float64)
        sums.sum_duplicates()
        # float64 rounds near 2**63: there, the repeats are added up exactly before refusing.
        if sums.nnz and sums.data.max() >= 2.0**62 and largest_exact_sum(counts) > np.iinfo(np.int64).max:
            raise InputError(source, field, "a sum of repeated entries is too large for a 64-bit integer", RAW_COUNTS_FIX)
        counts = _as_smallest_integer(counts, source, field).astype(np.int64)
    counts.sum_duplicates()
    counts.eliminate_zeros()
    return _as_smallest_integer(counts, source, field)


def validate_counts(adata: ad.AnnData, source, field="X") -> None:
    """Reject anything that is not a matrix of raw counts, naming the first bad entry so it can be found.

    ``field`` names the matrix of the file that ``adata.X`` was read from.
    """
    _require_cells_and_genes(adata.n_obs, adata.n_vars, source, field)
    counts = as_csr(adata.X)
    values = counts.data
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise InputError(source, field, f"dtype {values.dtype} is not a real number type", RAW_COUNTS_FIX)
    if np.issubdtype(values.dtype, np.floating):
        _reject_entries(adata, counts, ~np.isfinite(values), source, field, "non-finite values (NaN or inf)",
                        "replace missing counts by 0 or remove the affected cells; " + RAW_COUNTS_FIX)
    _reject_entries(adata, counts, values < 0, source, field, "negative values", RAW_COUNTS_FIX)
    if np.issubdtype(values.dtype, np.floating):
        _reject_entries(adata, counts, values != np.round(values), source, field, "non-integer values",
                        RAW_COUNTS_FIX)


def write_counts(adata: ad.AnnData, path) -> None:
    """Write an .h5ad so that readers never see a half-written file."""
    with atomic_output(path) as temporary_path:
        adata.write_h5ad(temporary_path)


def _require_cells_and_genes(n_cells: int, n_genes: int, source, field) -> None:
    if n_cells == 0 or n_genes == 0:
        raise InputError(
            source, field, f"the matrix is empty ({n_cells} cells x {n_genes} genes)",
            "pass a file with at least one cell and one gene",
        )


def as_csr(matrix) -> sp.csr_matrix:
    """CSR view of any matrix; sparse input is converted without densifying, CSR is returned as is."""
    if isinstance(matrix, sp.csr_matrix):
        return matrix
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix.tocsr())
    values = np.asarray(matrix)
    # scipy's sparse matrices have no float16; every integer count float16 holds, float32 holds too.
    return sp.csr_matrix(values.astype(np.float32) if values.dtype == np.float16 else values)


def _reject_entries(adata, counts, bad, source, field, what, fix) -> None:
    """Raise for the stored entries flagged in `bad`, naming the first one by cell and gene."""
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0:
        return
    first = int(np.argmax(bad))
    row = int(np.searchsorted(counts.indptr, first, side="right") - 1)
    gene = adata.var_names[counts.indices[first]]
    value = counts.data[first]
    raise InputError(
        source, field,
        f"{n_bad:,} {what} (first: cell {adata.obs_names[row]!r}, gene {gene!r} = {value:g})", fix,
    )


def _as_smallest_integer(counts: sp.csr_matrix, source, field) -> sp.csr_matrix:
    """Store checked counts as int32 when they fit (halves memory), else int64."""
    largest = counts.data.max() if counts.nnz else 0
    if int(largest) > np.iinfo(np.int64).max:
        raise InputError(source, field, f"count {largest:g} is too large for a 64-bit integer", RAW_COUNTS_FIX)
    dtype = np.int32 if largest <= np.iinfo(np.int32).max else np.int64
    return counts.astype(dtype, copy=False)
