"""``fit``: resolve the settings once, build the model, and hand both to an engine."""

from __future__ import annotations

import logging

import numpy as np
import pymc as pm

from scnbvi.batches import BatchSampler
from scnbvi.cell_rows import FitStatistics, as_rows
from scnbvi.design import Design
from scnbvi.errors import InputError
from scnbvi.inference import jax_engine, pymc_engine
from scnbvi.inference.backends import engine_for, require_backend
from scnbvi.inference.checkpoint import Checkpoint, fingerprint
from scnbvi.inference.hyperparameters import HYPERPARAMETER_ESTIMATES, collapse_hyperparameters
from scnbvi.inference.initialization import data_driven_initvals
from scnbvi.inference.memory import check_memory
from scnbvi.inference.recentring import recentre_cell_effects
from scnbvi.inference.result import FitResult
from scnbvi.inference.settings import InferenceSettings, effective_settings
from scnbvi.model import build_model, centring_weights
from scnbvi.offsets import MAX_ABS_LOG_OFFSET

log = logging.getLogger("scnbvi")

# Every engine is ``run(model, sampler, settings, backend, checkpoint) -> FitResult``.
ENGINES = {"pymc": pymc_engine.run, "jax": jax_engine.run}


def require_finite_inputs(statistics: FitStatistics, cell_log_offset, gene_log_offset, design: Design | None) -> None:
    """Stop before fitting on inputs that make the log density non-finite, so a loss that is
    not finite later can only come from the optimisation (and lowering the step size helps)."""
    def usable(offsets) -> bool:
        return bool(np.all(np.abs(offsets) <= MAX_ABS_LOG_OFFSET))  # False for NaN and inf too

    problems = {
        "counts": not statistics.valid,
        "cell_log_offset": not usable(cell_log_offset),
        "gene_log_offset": not usable(gene_log_offset),
        "design": design is not None and not np.all(np.isfinite(design.matrix)),
    }
    for field, bad in problems.items():
        if bad:
            raise InputError("fit", field, "holds values that are not finite (or negative counts, or log offsets "
                             f"beyond +-{MAX_ABS_LOG_OFFSET:g}), so the model's log density is not finite wherever "
                             "the fit starts",
                             "check the covariates step's tables (depth 0 gives log offset -inf) or the counts")


def fit(
    counts,
    cell_log_offset: np.ndarray,
    gene_log_offset: np.ndarray,
    settings: InferenceSettings,
    backend: str = "c",
    gene_dispersion: bool = True,
    cell_names=None,
    gene_names=None,
    design: Design | None = None,
    checkpoint_path=None,
) -> tuple[pm.Model, FitResult]:
    """Fit the model to cells x genes counts; returns the model and the fit.

    ``counts``: a matrix, or a store of rows that streams them from disk (:mod:`scnbvi.cell_rows`):
    the same fit either way.

    ``design``: per-cell covariates (:func:`scnbvi.design.build_design`), each with one
    effect per gene. ``checkpoint_path``: where the fit saves its progress every
    ``settings.checkpoint_minutes`` and when asked to stop, and resumes from; it stays after the
    fit, for the caller to remove (``checkpoint.remove_checkpoint``) once the results are written.
    """
    require_backend(backend)
    if settings.hyperparameters not in HYPERPARAMETER_ESTIMATES:
        raise ValueError(f"hyperparameters must be one of {HYPERPARAMETER_ESTIMATES}, got {settings.hyperparameters!r}")
    engine = engine_for(backend)
    rows = as_rows(counts)
    streamed = not hasattr(rows, "counts")
    if streamed and settings.minibatch == "entries":
        raise InputError("config", "inference.minibatch", "entries are drawn from anywhere in the matrix, which "
                         "needs the counts in memory, and they are larger than inference.stream_above_gb",
                         "use minibatch: cells, or raise inference.stream_above_gb")
    statistics = rows.statistics()
    require_finite_inputs(statistics, cell_log_offset, gene_log_offset, design)
    sampler = BatchSampler(rows, settings.minibatch, settings.batch_size, settings.seed)
    settings = effective_settings(settings, sampler.batch_size, sampler.steps_per_epoch,
                                  refits_cells=engine == "jax" and settings.minibatch == "cells")
    log.info("fitting %d cells x %d genes with engine %s, backend %s, counts %s, effective %s",
             *rows.shape, engine, backend, "streamed from disk" if streamed else "in memory", settings)
    check_memory(*rows.shape, rows.nnz, settings, streamed=streamed)
    cell_centring = centring_weights(statistics, cell_log_offset)
    model = build_model(
        cell_log_offset=cell_log_offset,
        gene_log_offset=gene_log_offset,
        mode=settings.minibatch,
        batch_size=settings.batch_size,
        gene_dispersion=gene_dispersion,
        cell_names=cell_names,
        gene_names=gene_names,
        initvals=(data_driven_initvals(statistics, cell_log_offset, gene_log_offset)
                  if settings.init == "data" else None),
        jax_forms=engine == "jax",
        design=None if design is None else design.matrix,
        coefficient_names=None if design is None else design.names,
        sample_coefficients=0 if design is None else design.n_sample_coefficients,
        cell_centring=cell_centring,
    )
    checkpoint = None
    if checkpoint_path is not None:
        arrays = {"cell_log_offset": cell_log_offset, "gene_log_offset": gene_log_offset,
                  "design": np.zeros((0, 0)) if design is None else design.matrix}
        options = {"backend": backend, "gene_dispersion": gene_dispersion}
        checkpoint = Checkpoint(checkpoint_path, fingerprint(statistics.digest, arrays, settings, options),
                                60 * settings.checkpoint_minutes)
    result = recentre_cell_effects(ENGINES[engine](model, sampler, settings, backend, checkpoint), cell_centring)
    if settings.hyperparameters == "collapsed":
        result = collapse_hyperparameters(model, result)
    log.info(
        "stopped after %d steps (%.2f epochs, %.1f s, compile %.1f s, %d learning-rate decays, final %g): %s",
        result.steps, result.epochs, result.fit_seconds, result.compile_seconds, result.decays,
        result.final_learning_rate, result.stop_reason,
    )
    return model, result
