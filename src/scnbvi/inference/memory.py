"""The memory a fit needs, estimated by part, so a run that cannot fit is refused before it starts."""

from __future__ import annotations

import logging
import os

from scnbvi.errors import InsufficientMemoryError
from scnbvi.batches import SHUFFLE_CHUNK_CELLS, SHUFFLE_WINDOW_CHUNKS
from scnbvi.inference.elbo import evaluation_cells
from scnbvi.inference.settings import InferenceSettings
from scnbvi.posterior import DRAWS_PER_CHUNK

log = logging.getLogger("scnbvi")
WINDOW_CELLS = SHUFFLE_CHUNK_CELLS * SHUFFLE_WINDOW_CHUNKS
CELL_DRAWS_KEPT = 10_000  # inference.cell_draws_max_cells's default


def estimate_memory_bytes(n_cells: int, n_genes: int, nnz: int, settings: InferenceSettings,
                          streamed: bool = False) -> dict[str, float]:
    """Peak bytes of a fit, by part. Streamed counts (:mod:`scnbvi.cell_rows`) hold one window of
    cells, read while the last is still held."""
    parameters = 2 * (n_cells + n_genes) + n_genes + 8
    if settings.minibatch == "cells":
        block_nnz = nnz / max(n_cells, 1) * settings.batch_size
        step = settings.batch_size * n_genes * 8 * 8 + block_nnz * 8 * 8
    else:
        step = settings.batch_size * 8 * 16
    return {
        "counts": (min(nnz, 2 * WINDOW_CELLS * nnz / max(n_cells, 1)) if streamed else nnz) * 8 * 2 + n_cells * 16,
        "variational parameters": parameters * 8 * 12,
        "minibatch step": step + 2 * 256e6,
        "convergence check": evaluation_cells(settings, n_genes) * n_genes * 8 * 8,
        # Per-cell variables are drawn DRAWS_PER_CHUNK draws at a time (normal draws, constrained values and
        # their moments); per-gene ones keep every draw until thinned, and at most CELL_DRAWS_KEPT cells theirs.
        "posterior draws": (DRAWS_PER_CHUNK * n_cells * 8 * 4
                            + settings.draws * (3 * n_genes + CELL_DRAWS_KEPT) * 4 * 1.5),
        "libraries": 600e6,
    }


def available_memory_bytes(settings: InferenceSettings) -> float:
    """The configured limit, else the job's SLURM allocation, else what the machine has free."""
    if settings.memory_limit_gb is not None:
        return settings.memory_limit_gb * 1e9
    if os.environ.get("SLURM_MEM_PER_NODE"):
        return float(os.environ["SLURM_MEM_PER_NODE"]) * 1e6
    import psutil

    return float(psutil.virtual_memory().available)


def check_memory(n_cells: int, n_genes: int, nnz: int, settings: InferenceSettings, streamed: bool = False) -> None:
    parts = estimate_memory_bytes(n_cells, n_genes, nnz, settings, streamed)
    needed, available = sum(parts.values()), available_memory_bytes(settings)
    largest = max(parts, key=parts.get)
    log.info("memory estimate %.2f GB of %.2f GB available (largest part: %s)", needed / 1e9, available / 1e9, largest)
    if needed > available:
        raise InsufficientMemoryError(
            f"fitting {n_cells} cells x {n_genes} genes needs about {needed / 1e9:.1f} GB "
            f"(largest part: {largest}, {parts[largest] / 1e9:.1f} GB) but {available / 1e9:.1f} GB are "
            "available; fix: lower inference.batch_size or inference.draws, select genes with "
            "slice.genes (hvg), or give the job more memory (mem_mb / inference.memory_limit_gb)"
        )
