"""Where the variational means start, and how wide q starts."""

from __future__ import annotations

import math

import numpy as np

from scnbvi.cell_rows import FitStatistics
from scnbvi.inference.settings import InferenceSettings


def data_driven_initvals(statistics: FitStatistics, cell_log_offset, gene_log_offset) -> dict:
    """Start gene effects at log mean expression and cell effects at log library size.

    The cell effects are centred (their prior mean is 0), so the shared level starts in the
    gene effects; this places the fit near the optimum and cuts the number of steps ADVI needs.
    """
    cell_totals, gene_totals = statistics.cell_totals, statistics.gene_totals
    cell_effect = np.log(cell_totals + 0.5) - cell_log_offset
    cell_effect -= cell_effect.mean()
    log_cell_exposure = np.logaddexp.reduce(cell_effect + cell_log_offset)
    gene_effect = np.log(gene_totals + 0.5) - log_cell_exposure - gene_log_offset
    return {
        "mu_gene": np.array(gene_effect.mean()),
        "sigma_gene": np.array(max(gene_effect.std(), 0.05)),
        "gene_effect": gene_effect,
        "sigma_cond": np.array(max(cell_effect.std(), 0.05)),
        "cell_effect": cell_effect,
    }


def initial_std(settings: InferenceSettings) -> float:
    """Start q narrow when starting from the data: a wide q on the many gene and cell effects
    would make noisy effects look costly and drag the scale parameters (sigma) away from the
    data before the means have settled. From the prior, keep PyMC's default (softplus(0))."""
    return settings.initial_std if settings.init == "data" else math.log(2.0)
