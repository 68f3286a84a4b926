"""The cells' counts as the fit reads them: held in memory, or streamed from the input a window of cells
at a time, behind one small interface, so that the sampler, the closing sweep and the statistics the
model starts from are the same code, and give the same numbers, either way.

A store has ``shape``, ``nnz``, ``cell_nnz`` (non-zeros per cell), ``rows(cells)`` (those cells'
counts, CSR, in that order), ``admit(cells, keep)`` (the cells about to be asked for: a streamed
store reads them in one pass and keeps only them and ``keep``; in memory it does nothing),
``prefetch(cells)`` (the cells to be admitted next: a streamed store reads them in the background
meanwhile) and ``blocks()`` (every cell's counts, in order, a block at a time).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, NamedTuple

import numpy as np
import scipy.sparse as sp

from scnbvi.data import SelectedCounts, as_csr

log = logging.getLogger("scnbvi")


class FitStatistics(NamedTuple):
    """What the fit needs of all the counts besides its minibatches, gathered in one pass."""

    cell_totals: np.ndarray  # per cell, over the selected genes
    cell_half_totals: tuple[np.ndarray, np.ndarray]  # per cell, over the even and over the odd genes
    cell_nnz: np.ndarray
    gene_totals: np.ndarray
    valid: bool  # every value finite and non-negative
    digest: str  # of the counts' layout and values, however they were cut into blocks

    @property
    def nnz(self) -> int:
        return int(self.cell_nnz.sum())


def fit_statistics(blocks: Iterable[sp.csr_matrix], n_genes: int) -> FitStatistics:
    """The statistics of consecutive blocks of cells (all genes each); a whole matrix is one block.
    Integer counts sum exactly in float64, so any cutting into blocks gives the same numbers. The sums
    are sparse products (compiled loops over the entries, no temporary arrays of their size)."""
    totals, evens, nnz, valid = [], [], [], True
    gene_totals = np.zeros(n_genes)
    even_genes = (np.arange(n_genes) % 2 == 0).astype(np.float64)
    hashes = [hashlib.blake2b(digest_size=16) for _ in range(3)]
    for block in blocks:
        block = as_csr(block)
        if block.nnz:
            valid &= bool(block.data.min() >= 0) and (np.issubdtype(block.dtype, np.integer)
                                                        or bool(np.isfinite(block.data).all()))
        totals.append(block @ np.ones(n_genes))
        evens.append(block @ even_genes)
        nnz.append(np.diff(block.indptr).astype(np.int64))
        gene_totals += np.ones(block.shape[0]) @ block
        for digest, values in zip(hashes, (nnz[-1], block.indices, block.data)):
            digest.update(np.ascontiguousarray(values))
    cell_totals, even = np.concatenate(totals), np.concatenate(evens)
    return FitStatistics(cell_totals, (even, cell_totals - even), np.concatenate(nnz), gene_totals, valid,
                         "".join(h.hexdigest() for h in hashes))


class InMemoryRows:
    """Every cell's counts in one CSR matrix."""

    def __init__(self, counts):
        self.counts = as_csr(counts)
        self.shape = self.counts.shape
        self.cell_nnz = np.diff(self.counts.indptr)
        self.nnz = int(self.counts.nnz)

    def rows(self, cells) -> sp.csr_matrix:
        return self.counts[np.asarray(cells)]

    def admit(self, cells, keep=()) -> None:
        """Nothing to read ahead: every row is here."""

    def prefetch(self, cells) -> None:
        """Nothing to read ahead: every row is here."""

    def blocks(self):
        yield self.counts

    def statistics(self) -> FitStatistics:
        return fit_statistics([self.counts], self.shape[1])


class StreamedRows:
    """The counts of the selection read from the input as they are needed: at most the cells last
    admitted (a window of the sampler's order, a group of the closing sweep's blocks) are held, and a
    cell asked for outside them is read on its own. ``reader`` is an open
    :class:`scnbvi.data.SelectedCounts`; ``block_entries`` bounds each read of the statistics' pass."""

    def __init__(self, reader, block_entries: int):
        self.reader, self.block_entries = reader, block_entries
        self.shape = reader.shape
        self._statistics = fit_statistics(reader.blocks(block_entries), self.shape[1])
        self.cell_nnz = self._statistics.cell_nnz
        self.nnz = self._statistics.nnz
        self._held = sp.csr_matrix((0, self.shape[1]), dtype=reader.dtype)
        self._slot = np.full(self.shape[0], -1, dtype=np.int64)  # each cell's row in _held, or -1
        # One read ahead, in a thread: the read's I/O and array copies release the GIL, so it runs
        # while the engine computes on what is held.
        self._reading = ThreadPoolExecutor(max_workers=1)
        self._next = None  # (cells, future of their rows) of the last prefetch

    def statistics(self) -> FitStatistics:
        return self._statistics

    def blocks(self):
        return self.reader.blocks(self.block_entries)

    def rows(self, cells) -> sp.csr_matrix:
        cells = np.asarray(cells)
        slots = self._slot[cells]
        if np.all(slots >= 0):
            return self._held[slots]
        unique, where = np.unique(cells, return_inverse=True)
        return self.reader.read(unique)[where]

    def prefetch(self, cells) -> None:
        """Read ``cells`` that are not held in the background, for the next ``admit``."""
        cells = np.unique(np.asarray(cells, dtype=np.int64))
        cells = cells[self._slot[cells] < 0]
        self._next = (cells, self._reading.submit(self.reader.read, cells)) if len(cells) else None

    def admit(self, cells, keep=()) -> None:
        """Hold ``cells`` and ``keep``, and nothing else: those held already are kept, the others read
        from the input in increasing order (or taken from the last prefetch, when it read them)."""
        wanted = np.union1d(np.asarray(cells, dtype=np.int64), np.asarray(keep, dtype=np.int64))
        held = self._slot[wanted] >= 0
        missing = wanted[~held]
        parts = [self._held[self._slot[wanted[held]]]]
        if len(missing):
            parts.append(self._read(missing))
        self._held = sp.vstack(parts, format="csr")
        self._slot[:] = -1
        self._slot[np.concatenate([wanted[held], missing])] = np.arange(len(wanted))

    def _read(self, cells: np.ndarray) -> sp.csr_matrix:
        """The rows of ``cells`` (increasing): from the last prefetch if it read them all, else read now."""
        if self._next is not None:
            fetched, rows = self._next
            where = np.searchsorted(fetched, cells)
            if np.all(where < len(fetched)) and np.array_equal(fetched[np.minimum(where, len(fetched) - 1)], cells):
                self._next = None
                rows = rows.result()
                return rows if len(cells) == len(fetched) else rows[where]
        return self.reader.read(cells)


def as_rows(counts):
    """A store of the cells' counts as is, any matrix as one held in memory."""
    return counts if hasattr(counts, "admit") else InMemoryRows(counts)


def weighted_sums(counts, weights: np.ndarray, expressed: bool = False) -> np.ndarray:
    """``weights @ counts`` (weights: rows x cells) over a matrix or a store of rows, a block of cells
    at a time: per-gene sums over groups of cells, or over their cells expressing the gene (counts
    above zero) with ``expressed``."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    rows = as_rows(counts)
    sums, first = np.zeros((weights.shape[0], rows.shape[1])), 0
    for block in rows.blocks():
        if expressed:
            block = (block > 0).astype(np.float64)
        sums += (block.T @ weights[:, first:first + block.shape[0]].T).T
        first += block.shape[0]
    return sums


@contextlib.contextmanager
def selected_counts(path, selection_path, stream_above_gb: float, block_entries: int = 50_000_000, **reading):
    """The selection (an AnnData of its obs and var) and a store of its counts, read from the input
    as ``scnbvi.data.read_selected_counts`` reads them (``reading``: its layer and duplicate_names):
    held in memory, or streamed when they would take more than ``stream_above_gb`` (4 bytes of index
    and the value's bytes per non-zero, from the selection's record of each gene's cells)."""
    with SelectedCounts(path, selection_path, **reading) as reader:
        selection = reader.selection
        nnz = int(selection.var["n_cells_expressed"].sum())
        if nnz * (reader.dtype.itemsize + 4) <= stream_above_gb * 1e9:
            adata = reader.anndata(block_entries)
            yield adata, InMemoryRows(adata.X)
        else:
            log.info("streaming the counts from %s: %d non-zeros, more than inference.stream_above_gb (%g GB)",
                     path, nnz, stream_above_gb)
            yield selection, StreamedRows(reader, block_entries)
