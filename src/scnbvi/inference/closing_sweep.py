"""The closing sweep of the jax engine: every cell refitted to its optimum given the final global
parameters, block by block, until each has settled."""

from __future__ import annotations

import logging
import time

import numpy as np

from scnbvi import batches
from scnbvi.batches import BATCH_LAYOUT, block_capacity, cell_block, nonzero_capacity, pad_nonzeros
from scnbvi.cell_rows import as_rows
from scnbvi.inference.elbo import cells_per_block
from scnbvi.inference.jax_objective import Objective

log = logging.getLogger("scnbvi.progress")

# The closing sweep's stopping rule: a cell has settled once the error its last Newton step
# left is below this fraction of its posterior sd; passes at most.
SETTLED_ERROR = 1e-2
MAX_CLOSING_PASSES = 10
# Cells per block of the closing sweep: about 4 million genes x cells entries, within these
# bounds. On 2 cores a whole atlas (39,241 genes) sweeps 1.5x faster in blocks of 256 cells
# than of 101, and 3,000 HVGs fastest in blocks of 1,024.
SWEEP_BLOCK_CELLS = (256, 1024)


def sweep_block_size(n_genes: int) -> int:
    """The closing sweep's cells per block for ``n_genes`` genes."""
    return cells_per_block(n_genes, *SWEEP_BLOCK_CELLS)


def closing_refit(target: Objective):
    """The closing sweep's jitted step: a block refitted once, and each cell's error left after
    its step, in units of its posterior sd: about half the step's square (the log likelihood's
    curvature changes as exp of the cell's effect)."""
    import jax
    import jax.numpy as jnp

    def refit_and_measure(params, batch):
        cells = batch["cell_index"]
        before = params["cell_mean"][cells]
        params = target.refit_cells(params, batch)
        return params, 0.5 * (params["cell_mean"][cells] - before) ** 2 * jnp.exp(-params["cell_log_sd"][cells])

    return jax.jit(refit_and_measure)


def sweep_shapes(rows, block_size: int) -> tuple[int, int]:
    """The block of the closing sweep (at most every cell) and its usual non-zero capacity."""
    block_size = min(block_size, rows.shape[0])
    return block_size, block_capacity(rows.cell_nnz, block_size)


def refit_every_cell(refit, params: dict, counts, block_size: int, log_every_seconds: float = 10.0) -> dict:
    """Every cell at its optimum given the final global parameters, block by block: a cell's
    q was last updated when its block came round, before the global parameters settled.
    ``refit`` is :func:`closing_refit` of the fit's objective.

    Each pass gives the cells still short of their optimum one Newton step and estimates the
    error each step left; the next pass takes only the cells whose error is above
    ``SETTLED_ERROR`` sds. On the stacked atlas one pass settles 81 % of the cells and five
    settle all: 1.2 steps per cell, where a fixed count needed three. ``counts``: a matrix or a
    store of rows (:mod:`scnbvi.cell_rows`), which holds a window of the sampler's size at a time.
    A pass that runs longer than ``log_every_seconds`` says how far it is.
    """
    rows = as_rows(counts)
    block_size, capacity = sweep_shapes(rows, block_size)
    fillers = np.argsort(rows.cell_nnz, kind="stable")[:block_size]
    blocks_per_window = max(1, batches.SHUFFLE_CHUNK_CELLS * batches.SHUFFLE_WINDOW_CHUNKS // block_size)
    moving = np.arange(rows.shape[0])
    for sweep in range(1, MAX_CLOSING_PASSES + 1):
        blocks, errors = blocks_covering(moving, block_size, fillers), []
        started = last_line = time.perf_counter()
        for number, cells in enumerate(blocks):
            if time.perf_counter() - last_line >= log_every_seconds:
                last_line = time.perf_counter()
                log.info("closing sweep, pass %d: %d of %d cells refitted (%.0f s)", sweep, number * block_size,
                         len(moving), last_line - started)
            if number % blocks_per_window == 0:
                rows.admit(np.unique(np.concatenate(blocks[number:number + blocks_per_window])))
                following = blocks[number + blocks_per_window:number + 2 * blocks_per_window]
                if following:
                    rows.prefetch(np.concatenate(following))
            block = cell_block(rows, cells)
            capacity = max(capacity, nonzero_capacity(len(block["nz_count"])))
            params, block_errors = refit(params, pad_nonzeros(block, capacity))
            errors.append(block_errors)  # read after the pass: the next block is staged meanwhile
        moving = np.unique(np.concatenate([cells[np.asarray(e) > SETTLED_ERROR] for cells, e in zip(blocks, errors)]))
        if not len(moving):
            break
    return params


def blocks_covering(cells: np.ndarray, block_size: int, fillers: np.ndarray) -> list[np.ndarray]:
    """``cells`` in blocks of one shape, each sorted; the last block is topped up with
    ``fillers`` it lacks (the ``block_size`` cells of fewest non-zeros), which a refit leaves
    at their optimum: the blocks then fit the sweep's non-zero capacity, and the refit
    compiles once."""
    blocks = [cells[start:start + block_size] for start in range(0, len(cells), block_size)]
    missing = block_size - len(blocks[-1])
    if missing:
        others = np.setdiff1d(fillers, blocks[-1], assume_unique=True)
        blocks[-1] = np.concatenate([blocks[-1], others[:missing]])
    return [np.sort(block) for block in blocks]


def compile_sweep(sweep, params: dict, rows, block_size: int) -> None:
    """Compile the sweep's step ahead, with the checks, so that it is not on the clock of the fit."""
    import jax

    block_size, capacity = sweep_shapes(rows, block_size)
    shapes = {name: jax.ShapeDtypeStruct((block_size if name == "cell_index" else capacity,), dtype)
              for name, dtype in BATCH_LAYOUT["cells"].items()}
    sweep.lower(params, shapes).compile()
