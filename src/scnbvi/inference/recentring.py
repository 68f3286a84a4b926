"""The likelihood's one flat direction, settled after the fit.

A constant added to every cell effect and taken from every gene effect (and ``mu_gene``)
changes no rate, so only the priors decide where along that line the effects sit: the cell
effects' ``N(0, sigma_cond)`` wants their mean at 0. Stochastic steps move the gene effects at
every step but a cell only when it is drawn, and the closing sweep refits every cell to the
gene effects as they ended; on atlas-sized data, fitted in one or two epochs, the cell effects
ended with a mean of 0.87 (186,224 cells, sd 0.36), which ``sigma_cond`` then took for spread.

Each cell's q is its posterior given the gene effects and ``sigma_cond`` (the closing sweep
refits it so), which holds the cell's likelihood as a Gaussian (precision ``lambda_i = 1/s_i^2 -
1/sigma^2``, as :mod:`scnbvi.inference.hyperparameters` reads it). Moving the gene effects by k
moves that likelihood by -k; k is chosen where the cells' marginal likelihood and ``mu_gene``'s
prior are highest, and each cell's posterior follows in closed form: ``m_i - k lambda_i
s_i^2``, all of k for a cell its counts pin, none for one they do not inform.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from scnbvi.inference.hyperparameters import likelihood_as_normal
from scnbvi.inference.result import FitResult
from scnbvi.model import PRIOR_MU_SD, RAW_CELL_EFFECT

log = logging.getLogger("scnbvi")


def recentre_cell_effects(result: FitResult, cell_centring: np.ndarray) -> FitResult:
    """``result`` with the gene effects and ``mu_gene`` moved by k and each cell's mean by
    ``k lambda_i s_i^2`` the other way (q's sds stay). ``cell_centring``: the model's weights w_i
    of the partially non-centred cell effects, ``c_i = sigma^(1 - w_i) raw_i``
    (:func:`scnbvi.model.cell_effects`)."""
    means = dict(result.means)
    sigma_cond = float(np.exp(means["sigma_cond_log__"]))
    per_raw_unit = sigma_cond ** (1.0 - np.asarray(cell_centring, dtype=np.float64))
    mean = per_raw_unit * np.asarray(means[RAW_CELL_EFFECT], dtype=np.float64)
    sd = per_raw_unit * np.asarray(result.stds[RAW_CELL_EFFECT], dtype=np.float64)
    precision, natural_mean = likelihood_as_normal(mean, sd, 0.0, sigma_cond)
    # Each cell's estimate eta_i / lambda_i is N(k, sigma^2 + 1/lambda_i): weights lambda_i / (1 + lambda_i sigma^2).
    spread = 1.0 + precision * sigma_cond**2
    mu_gene = float(means["mu_gene"])
    shift = ((np.sum(natural_mean / spread) - mu_gene / PRIOR_MU_SD**2)
             / (np.sum(precision / spread) + 1.0 / PRIOR_MU_SD**2))
    moved = mean - shift * precision * sd**2
    means[RAW_CELL_EFFECT] = (moved / per_raw_unit).astype(means[RAW_CELL_EFFECT].dtype)
    means["gene_effect"] = (means["gene_effect"] + shift).astype(means["gene_effect"].dtype)
    means["mu_gene"] = np.asarray(mu_gene + shift, dtype=np.asarray(means["mu_gene"]).dtype)
    log.info("gene effects and mu_gene moved by %+.4g, the cell effects with them (their mean %.4g before, "
             "%.4g after; sd %.4g)", shift, float(mean.mean()), float(moved.mean()), float(mean.std()))
    return replace(result, means=means)
