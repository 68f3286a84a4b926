"""Samplers of the NB: counts replicated for the posterior predictive check, and simulated data."""

from __future__ import annotations

import numpy as np


def sample_counts(rng: np.random.Generator, mu: np.ndarray, alpha) -> np.ndarray:
    """Counts with mean ``mu`` and variance ``mu + mu^2 / alpha``, each entry's Gamma rate and
    Poisson count drawn in turn: the counts of a matrix do not depend on how it is split into
    blocks (the posterior predictive check draws one block of cells at a time)."""
    return rng.negative_binomial(alpha, alpha / (alpha + mu))


def sample_counts_in_two_passes(rng: np.random.Generator, mu: np.ndarray, alpha) -> np.ndarray:
    """Counts of the same NB drawn as a Gamma-Poisson mixture, every rate ~ Gamma(alpha, mu/alpha)
    first, then every count: the order in which the simulator draws its data sets, so that a seed
    keeps giving the data set that the tests and benchmarks built on it expect."""
    return rng.poisson(rng.gamma(alpha, mu / alpha))
