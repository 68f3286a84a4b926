"""When to shrink the learning rate and when to stop, judged at each check.

``elbo`` (:class:`DecayThenStop`): a plateau of a low-noise ELBO first shrinks the learning
rate, and only a plateau after the last allowed shrink stops the fit. ``parameters``
(:class:`ParameterChangeStop`): the original notebook's rule, stop when the variational
parameters barely move (``pm.callbacks.CheckParametersConvergence``).
"""

from __future__ import annotations

import numpy as np

from scnbvi.inference.settings import InferenceSettings

CONVERGENCE_RULES = ("elbo", "parameters")


class DecayThenStop:
    """Plateau rule with two jobs: learning-rate scheduler and stopping rule.

    A plateau is a relative ELBO gain below ``tolerance`` over the last ``patience`` checks.
    It first multiplies the learning rate by ``decay`` (at most ``max_decays`` times): a
    plateau that is only the noise floor of the current step size gives way, and a fit is
    never declared converged because its steps were made too small to move, as a fixed decay
    schedule would. The next plateau stops the fit.
    """

    def __init__(self, tolerance: float, patience: int, decay: float = 1.0, max_decays: int = 0):
        self.tolerance, self.patience = tolerance, patience
        self.decay, self.max_decays = decay, max_decays if decay < 1 else 0
        self.decays = 0
        self.history: list[float] = []

    @property
    def learning_rate_scale(self) -> float:
        """The factor by which plateaus have shrunk the learning rate so far."""
        return self.decay**self.decays

    def update(self, elbo: float) -> bool:
        """Record a check's ELBO; True once the fit should stop."""
        self.history.append(elbo)
        if len(self.history) <= self.patience:
            return False
        past = self.history[-1 - self.patience]
        if (elbo - past) / abs(elbo) >= self.tolerance:
            return False
        if self.decays < self.max_decays:
            self.decays += 1
            return False
        return True


def relative_gains(history: list[float], patience: int) -> list[float]:
    """Relative ELBO gain over ``patience`` checks at each check that has one, as
    :class:`DecayThenStop` judges it (its progress lines and the ELBO plot show it too)."""
    return [(history[k] - history[k - patience]) / abs(history[k]) for k in range(patience, len(history))]


class ParameterChangeStop:
    """Stop when the largest relative change of the variational parameters between two
    checks is below ``tolerance``; the learning rate never changes."""

    decays = max_decays = 0
    learning_rate_scale = 1.0

    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self._previous: np.ndarray | None = None

    def update(self, params: np.ndarray) -> bool:
        previous, self._previous = self._previous, np.array(params, copy=True)
        if previous is None:
            return False
        return float(np.max(np.abs((params - previous) / previous))) < self.tolerance


def learning_rate(settings: InferenceSettings, rule: DecayThenStop | ParameterChangeStop) -> float:
    """The step size now: the configured one, shrunk by the plateaus the rule has seen."""
    return settings.learning_rate * rule.learning_rate_scale


def stopping_rule(settings: InferenceSettings) -> DecayThenStop | ParameterChangeStop:
    if settings.convergence == "elbo":
        return DecayThenStop(settings.tolerance, settings.patience, settings.learning_rate_decay, settings.max_decays)
    if settings.convergence == "parameters":
        return ParameterChangeStop(settings.tolerance)
    raise ValueError(f"convergence must be one of {CONVERGENCE_RULES}, got {settings.convergence!r}")
