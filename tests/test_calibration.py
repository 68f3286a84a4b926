"""Calibration: 90 % intervals of the ADVI posterior hold the truth about 9 times in 10.

Data sets are simulated from the model itself (per-gene dispersion around alpha 2 with log sd
0.3), each fitted as the workflow fits (jax engine, default settings). Gene and cell effects
and per-gene dispersions are pooled over genes, cells and data sets; the scales and the
dispersion's population parameters count once per data set.
"""

from __future__ import annotations

import numpy as np
import pytest

from scnbvi.calibration import central_interval_hits, coverage_hits
from scnbvi.inference import InferenceSettings, fit
from scnbvi.posterior import draw_posterior
from scnbvi.simulate import SimulationTruth, simulate_counts

N_DATASETS = 20
SHAPE = (500, 80)
TRUTH = SimulationTruth(sigma_gene=1.0, sigma_cond=0.3, alpha=2.0, log_alpha_sd=0.3)


def test_interval_hits_count_the_truths_inside_the_central_interval():
    draws = np.linspace(0.0, 1.0, 1001)[:, None] * np.ones((1, 3))
    hits = central_interval_hits(draws, np.array([0.04, 0.5, 0.96]))
    assert hits.tolist() == [False, True, False]


@pytest.fixture(scope="module")
def pooled_hits():
    pooled: dict[str, list] = {}
    for seed in range(1, N_DATASETS + 1):
        adata = simulate_counts(*SHAPE, seed=seed, truth=TRUTH)
        settings = InferenceSettings(draws=1000, log_every_seconds=1e9)
        model, result = fit(adata.X, np.log(adata.obs["depth"].to_numpy() / 1e5),
                            np.log(adata.var["length"].to_numpy() / 2000), settings, backend="jax",
                            cell_names=adata.obs_names, gene_names=adata.var_names)
        posterior = draw_posterior(model, result, settings.draws, settings.seed).posterior
        for name, hits in coverage_hits(posterior, adata).items():
            pooled.setdefault(name, []).append(hits)
    return {name: np.concatenate(hits) for name, hits in pooled.items()}


@pytest.mark.slow
@pytest.mark.parametrize("quantity", [
    "centred gene effects", "centred cell effects", "log alpha per gene", "sigma_gene", "sigma_cond",
])
def test_ninety_percent_intervals_cover_the_truth_nine_times_in_ten(pooled_hits, quantity):
    coverage = pooled_hits[quantity].mean()
    print(f"{quantity}: coverage {coverage:.3f} over {pooled_hits[quantity].size}")
    assert 0.85 <= coverage <= 0.95, f"{quantity}: 90 % intervals hold the truth {coverage:.3f} of the time"
