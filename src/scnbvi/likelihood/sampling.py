"""The NB's sampler: simulated data sets, and the replicated counts that the posterior predictive
check's closed forms are tested and measured against."""

from __future__ import annotations

import numpy as np


def sample_counts(rng: np.random.Generator, mu: np.ndarray, alpha) -> np.ndarray:
    """Counts with mean ``mu`` and variance ``mu + mu^2 / alpha``, drawn as a Gamma-Poisson mixture:
    every rate ~ Gamma(alpha, mu/alpha) first, then every count (the order a seed's simulated data
    sets were drawn in, which the tests and benchmarks built on them expect)."""
    return rng.poisson(rng.gamma(alpha, mu / alpha))
