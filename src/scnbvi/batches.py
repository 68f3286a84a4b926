"""Minibatches drawn from the cells' counts (a sparse matrix, or a store that streams them from
disk: :mod:`scnbvi.cell_rows`), with counts and indices kept aligned.

A block of cells is passed as its non-zero entries, so nothing is densified and memory scales
with the batch, not with the data set.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from scnbvi.cell_rows import as_rows

MINIBATCH_MODES = ("cells", "entries")

# The arrays of one minibatch, by layout, with their dtypes: the model declares one data
# container per name, and every batch below is built through ``make_batch``. A ``cells`` block
# is its cells' indices plus its non-zero entries (row within the block, gene, count).
BATCH_LAYOUT = {
    "cells": {"cell_index": np.int32, "nz_row": np.int32, "nz_gene": np.int32, "nz_count": np.float64},
    "entries": {"counts": np.float64, "cell_index": np.int32, "gene_index": np.int32},
}


def make_batch(mode: str, **arrays) -> dict[str, np.ndarray]:
    """A minibatch of the given layout, every array in its declared dtype."""
    layout = BATCH_LAYOUT[mode]
    if set(arrays) != set(layout):
        raise ValueError(f"a {mode!r} batch has arrays {sorted(layout)}, got {sorted(arrays)}")
    return {name: np.asarray(arrays[name], dtype=dtype).ravel() for name, dtype in layout.items()}


def empty_batch(mode: str, batch_size: int) -> dict[str, np.ndarray]:
    """A zero-filled batch with the shapes of the given layout (one non-zero slot per block)."""
    sizes = {"nz_row": 1, "nz_gene": 1, "nz_count": 1}
    return make_batch(mode, **{name: np.zeros(sizes.get(name, batch_size)) for name in BATCH_LAYOUT[mode]})


# The shuffle of each epoch: cells in chunks of SHUFFLE_CHUNK_CELLS consecutive ones, chunks in a random
# order, SHUFFLE_WINDOW_CHUNKS of them (a window) shuffled together. A streamed fit then reads a window
# as a thousand sequential runs and holds only it (about 0.5 GB of an atlas's counts); chunks this
# small mix cells that a file keeps in order of sample. A data set of one window is shuffled whole,
# as one permutation of its cells.
SHUFFLE_CHUNK_CELLS = 64
SHUFFLE_WINDOW_CHUNKS = 1024


def epoch_windows(rng: np.random.Generator, n_cells: int) -> list[np.ndarray]:
    """One epoch's order of the cells, as the windows it reads them in."""
    n_chunks = -(-n_cells // SHUFFLE_CHUNK_CELLS)
    if n_chunks <= SHUFFLE_WINDOW_CHUNKS:
        return [rng.permutation(n_cells)]
    chunks = rng.permutation(n_chunks)
    windows = []
    for first in range(0, n_chunks, SHUFFLE_WINDOW_CHUNKS):
        starts = np.sort(chunks[first:first + SHUFFLE_WINDOW_CHUNKS]) * SHUFFLE_CHUNK_CELLS
        cells = np.concatenate([np.arange(start, min(start + SHUFFLE_CHUNK_CELLS, n_cells)) for start in starts])
        windows.append(rng.permutation(cells))
    return windows


class BatchSampler:
    """Draws minibatches in one of the model's layouts from the cells' counts (cells x genes): a
    matrix, or a store of :mod:`scnbvi.cell_rows` that streams them from disk.

    ``cells``: epochs of a seeded shuffle of the cells (:func:`epoch_windows`), cut into blocks of
    ``batch_size`` whole cells (a block that straddles two windows takes its tail from the next, so
    every block has the same shape). ``entries``: ``batch_size`` (cell, gene) pairs drawn uniformly
    with replacement from all cells x genes, zeros included, as the original notebook; it needs the
    counts in memory.
    """

    def __init__(self, counts, mode: str, batch_size: int, seed: int):
        if mode not in MINIBATCH_MODES:
            raise ValueError(f"minibatch mode must be one of {MINIBATCH_MODES}, got {mode!r}")
        self.rows = as_rows(counts)
        if mode == "entries" and not hasattr(self.rows, "counts"):
            raise ValueError("the entries layout draws entries from anywhere in the matrix: it needs the counts "
                             "in memory")
        self.mode = mode
        self.n_cells, self.n_genes = self.rows.shape
        limit = self.n_cells if mode == "cells" else self.n_cells * self.n_genes
        self.batch_size = int(min(batch_size, limit))
        self._rng = np.random.default_rng(seed)
        self._queue = np.empty(0, dtype=np.int64)
        self._windows: list[np.ndarray] = []  # windows not queued yet (the next epoch's once this one's are)
        self.steps_per_epoch = limit / self.batch_size

    def _next_cells(self) -> np.ndarray:
        while len(self._queue) < self.batch_size:
            if not self._windows:
                self._windows = epoch_windows(self._rng, self.n_cells)
            window = self._windows.pop(0)
            self.rows.admit(window, keep=self._queue)
            self._queue = np.concatenate([self._queue, window])
            if not self._windows:  # the next epoch's order, drawn now so that its first window reads ahead
                self._windows = epoch_windows(self._rng, self.n_cells)
            self.rows.prefetch(self._windows[0])
        cells, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
        return np.sort(cells)

    def get_state(self) -> dict:
        """Where the sampler is: its RNG and the rest of the current epoch (for checkpoints)."""
        return {"rng": self._rng.bit_generator.state, "queue": self._queue.copy(),
                "windows": [window.copy() for window in self._windows]}

    def set_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._queue = state["queue"].copy()
        self._windows = [window.copy() for window in state["windows"]]
        self.rows.admit(self._queue)

    def next_stack(self, length: int, capacity: int = 0) -> tuple[dict[str, np.ndarray], int]:
        """The next ``length`` minibatches stacked, one per row, as a scan over steps takes
        them. ``cells`` blocks are padded to one non-zero capacity, at least ``capacity`` (grown
        only if a block needs more). Returns the stack and the capacity used."""
        if self.mode == "cells":
            return stack_cell_blocks(self.rows, [self._next_cells() for _ in range(length)], capacity)
        batches = [self.next() for _ in range(length)]
        return {name: np.stack([b[name] for b in batches]) for name in batches[0]}, capacity

    def next(self) -> dict[str, np.ndarray]:
        """The next minibatch, as arrays named after the model's data containers."""
        if self.mode == "cells":
            return cell_block(self.rows, self._next_cells())
        flat = self._rng.integers(0, self.n_cells * self.n_genes, size=self.batch_size)
        cells, genes = np.divmod(flat, self.n_genes)
        return make_batch("entries", counts=self.rows.counts[cells, genes], cell_index=cells, gene_index=genes)

    def evaluation_batch(self, n_cells: int, seed: int) -> dict[str, np.ndarray]:
        """A fixed batch of whole cells for a low-noise estimate of the full-data ELBO.

        The model's ``total_size`` scales it to the data set. In the ``entries`` layout the same
        cells are given as all their (cell, gene) triples, so the estimate means the same thing
        in both layouts.
        """
        n_eval = min(n_cells, self.n_cells)
        cells = np.sort(np.random.default_rng(seed).choice(self.n_cells, n_eval, replace=False))
        if self.mode == "cells":
            return cell_block(self.rows, cells)
        return make_batch(
            "entries",
            counts=self.rows.rows(cells).toarray(),
            cell_index=np.repeat(cells, self.n_genes),
            gene_index=np.tile(np.arange(self.n_genes), n_eval),
        )


def entry_positions(rows: sp.csr_matrix, positions: np.ndarray) -> np.ndarray:
    """For each non-zero entry of ``rows``, the position given to its row."""
    return np.repeat(np.asarray(positions, dtype=np.int32), np.diff(rows.indptr))


def cell_block(counts, cells: np.ndarray) -> dict[str, np.ndarray]:
    """The given cells (of a matrix or a store of rows) in the ``cells`` layout: their indices and
    their non-zero entries."""
    rows = as_rows(counts).rows(np.asarray(cells))
    return make_batch("cells", cell_index=cells, nz_row=entry_positions(rows, np.arange(len(cells))),
                      nz_gene=rows.indices, nz_count=rows.data)


def stack_cell_blocks(counts, blocks: list[np.ndarray], capacity: int = 0) -> tuple[dict, int]:
    """Blocks of equally many cells as stacked ``cells`` batches, each block's non-zero entries
    padded with zero counts to one capacity, at least ``capacity``: what :func:`cell_block` and
    :func:`pad_nonzeros` give block by block, from one row gather of all the blocks' cells
    and a copy of each block's run of entries (8x faster than index arithmetic over the
    entries, which took 4 ms of a 20 ms step on a whole atlas). Returns the stack and the
    capacity used."""
    size = len(blocks[0])
    cells = np.concatenate(blocks)
    rows = as_rows(counts).rows(cells)  # scipy's row gather: a copy in C of just these cells' entries
    bounds = rows.indptr[::size]
    per_block = np.diff(bounds)
    capacity = max(capacity, nonzero_capacity(int(per_block.max())))
    stack = {"cell_index": cells.reshape(len(blocks), size).astype(np.int32)}
    entries = {"nz_row": entry_positions(rows, np.tile(np.arange(size), len(blocks))),
               "nz_gene": rows.indices, "nz_count": rows.data}
    for name, values in entries.items():
        stack[name] = np.zeros((len(blocks), capacity), dtype=BATCH_LAYOUT["cells"][name])
        for block, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            stack[name][block, : end - start] = values[start:end]
    return {name: stack[name] for name in BATCH_LAYOUT["cells"]}, capacity


def nonzero_capacity(nnz: int, minimum: int = 1024) -> int:
    """nnz rounded up to the next of eight steps per power of two: a handful of distinct
    shapes lets a compiled (JAX) step be reused across blocks instead of being recompiled for
    each one, and padding wastes at most a quarter of the work."""
    if nnz <= minimum:
        return minimum
    grain = max(1, (1 << (nnz - 1).bit_length()) // 8)
    return -(-nnz // grain) * grain


def block_capacity(cell_nnz: np.ndarray, batch_size: int) -> int:
    """A non-zero capacity that a random block of ``batch_size`` cells almost never exceeds
    (the mean of a block's non-zeros plus five standard deviations, at most those of the
    largest cells): one compiled step then serves the whole fit, where a capacity fitted to
    each chunk of blocks would recompile whenever a chunk's largest block crossed a size."""
    per_cell = np.asarray(cell_nnz)
    bound = batch_size * per_cell.mean() + 5 * np.sqrt(batch_size) * per_cell.std()
    largest = np.sort(per_cell)[-batch_size:].sum()
    return nonzero_capacity(int(min(bound, largest)))


def pad_nonzeros(batch: dict[str, np.ndarray], capacity: int) -> dict[str, np.ndarray]:
    """Pad a ``cells`` block's non-zero entries to ``capacity`` with zero counts, which add
    exactly nothing to the likelihood."""
    nnz = len(batch["nz_count"])
    padded = dict(batch)
    for name in ("nz_row", "nz_gene", "nz_count"):
        padded[name] = np.zeros(capacity, dtype=batch[name].dtype)
        padded[name][:nnz] = batch[name]
    return padded
