"""Does a fit's posterior cover the truth of data simulated from the model?

Interval coverage over many simulated data sets is the check a Bayesian reviewer asks for
first: a 90 % interval that holds the truth far less often than 9 times in 10 is too narrow
(or biased), whatever the ELBO says. Gene and cell effects are compared centred (their
common level trades off with ``mu_gene``); the scales and dispersions as they are.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import xarray as xr


def central_interval_hits(draws: np.ndarray, truth, level: float = 0.9) -> np.ndarray:
    """Whether each truth lies in the central ``level`` interval of its draws (first axis)."""
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return (low <= truth) & (truth <= high)


def _draws(posterior: xr.Dataset, name: str) -> np.ndarray:
    """Draws of one variable with chains and draws flattened into the first axis."""
    values = posterior[name].values
    return values.reshape(-1, *values.shape[2:]).astype(np.float64)


def coverage_hits(posterior: xr.Dataset, simulated: ad.AnnData, level: float = 0.9) -> dict[str, np.ndarray]:
    """Per quantity, whether the fit's central interval holds the simulation's truth.

    Cell effects are compared over the cells whose draws the trace keeps. With per-gene
    dispersion, each gene's log alpha and the population parameters of log alpha are checked;
    otherwise the shared alpha.
    """
    truth = simulated.uns["truth"]
    gene = _draws(posterior, "gene_effect")
    true_gene = simulated.var["true_gene_effect"].to_numpy()
    cells = list(posterior["cell"].values)
    cell = _draws(posterior, "cell_effect")
    true_cell = simulated.obs.loc[cells, "true_cell_effect"].to_numpy()
    hits = {
        "centred gene effects": central_interval_hits(
            gene - gene.mean(axis=1, keepdims=True), true_gene - true_gene.mean(), level),
        "centred cell effects": central_interval_hits(
            cell - cell.mean(axis=1, keepdims=True), true_cell - true_cell.mean(), level),
        "sigma_gene": central_interval_hits(_draws(posterior, "sigma_gene"), truth["sigma_gene"], level),
        "sigma_cond": central_interval_hits(_draws(posterior, "sigma_cond"), truth["sigma_cond"], level),
    }
    if "log_alpha" in posterior:
        true_log_alpha = np.log(simulated.var["true_alpha"].to_numpy())
        hits["log alpha per gene"] = central_interval_hits(_draws(posterior, "log_alpha"), true_log_alpha, level)
        hits["log_alpha_mean"] = central_interval_hits(
            _draws(posterior, "log_alpha_mean"), np.log(truth["alpha"]), level)
        hits["log_alpha_sd"] = central_interval_hits(_draws(posterior, "log_alpha_sd"), truth["log_alpha_sd"], level)
    else:
        hits["alpha"] = central_interval_hits(_draws(posterior, "alpha"), truth["alpha"], level)
    return {name: np.atleast_1d(value) for name, value in hits.items()}
