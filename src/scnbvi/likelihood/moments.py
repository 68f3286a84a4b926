"""Closed forms of the NB (mean ``mu``, dispersion ``alpha``): the probability of a zero and the
cumulants up to the fourth, which give the exact mean and variance of the statistics the posterior
predictive check compares, instead of replicating every count.

Each function takes an array namespace (``numpy`` or ``jax.numpy``) so that the check evaluates
them inside its compiled program and the tests against scipy with numpy.
"""

from __future__ import annotations

import numpy as np


def log_zero_probability(mu, alpha, xp=np):
    """log P(y = 0) = alpha log(alpha / (alpha + mu)), through log1p: exact for small mu / alpha
    (and P(y > 0) = -expm1 of it, exact for rare genes)."""
    return -alpha * xp.log1p(mu / alpha)


def cumulants(mu, alpha):
    """The second, third and fourth cumulants: with q = mu / alpha, mu (1 + q), mu (1 + q)(1 + 2q)
    and mu (1 + q)(1 + 6q + 6q^2) (the Poisson's mu, mu, mu as alpha grows)."""
    q = mu / alpha
    second = mu * (1 + q)
    return second, second * (1 + 2 * q), second * (1 + 6 * q * (1 + q))
