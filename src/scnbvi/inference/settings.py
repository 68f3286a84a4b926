"""What a fit is asked to do, what it really ran with, and what came out of it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd


def settings_from_section(cls, section: dict):
    """A settings dataclass from its config section, ignoring keys the dataclass does not know
    (the schema's section may hold more than one step uses)."""
    return cls(**{key: value for key, value in section.items() if key in cls.__dataclass_fields__})


@dataclass(frozen=True)
class InferenceSettings:
    """How to fit; mirrors the ``inference`` section of the workflow config (same defaults)."""

    minibatch: str = "cells"
    batch_size: int = 128
    max_iterations: int = 300_000
    learning_rate: float = 0.05
    learning_rate_decay: float = 0.5
    max_decays: int = 3
    seed: int = 0
    draws: int = 1000
    init: str = "data"
    initial_std: float = 0.05
    convergence: str = "elbo"
    hyperparameters: str = "collapsed"
    tolerance: float = 1e-4
    check_every: int = 250
    patience: int = 2
    eval_cells: int = 1024
    eval_samples: int = 4
    memory_limit_gb: float | None = None
    log_every_seconds: float = 10.0
    checkpoint_minutes: float = 5.0

    @classmethod
    def from_config(cls, section: dict) -> InferenceSettings:
        """Settings from the config's ``inference`` section; keys the fit does not use are ignored."""
        return settings_from_section(cls, section)


def effective_settings(settings: InferenceSettings, batch_size: int, steps_per_epoch: float,
                       refits_cells: bool = False) -> InferenceSettings:
    """The settings a fit really runs with, resolved once before any engine starts.

    ``batch_size`` is what the sampler could draw (at most every cell, or every entry). In the
    ``cells`` layout the check interval is stretched to at least one epoch: a cell's own
    parameters only learn when its block comes round, once per epoch, and judging a plateau
    (and shrinking the step size) faster than that would freeze them on large data. An engine
    that ``refits_cells`` to their optimum at each check and at the end needs no such wait.
    """
    check_every = settings.check_every
    if settings.minibatch == "cells" and not refits_cells:
        check_every = max(check_every, math.ceil(steps_per_epoch))
    return replace(settings, batch_size=batch_size, check_every=check_every)


@dataclass
class FitResult:
    """The fitted mean-field Gaussian (unconstrained space) and how the fit went.

    ``settings`` are the effective ones (see :func:`effective_settings`); ``decays`` is how
    often a plateau shrank the learning rate, ending at ``final_learning_rate``.
    """

    means: dict[str, np.ndarray]
    stds: dict[str, np.ndarray]
    losses: np.ndarray
    checks: list[tuple[int, float]]
    epochs: float
    converged: bool
    fit_seconds: float
    compile_seconds: float
    engine: str
    backend: str
    settings: InferenceSettings
    decays: int
    final_learning_rate: float

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def stop_reason(self) -> str:
        if self.converged:
            return f"converged ({self.settings.convergence} rule, tolerance {self.settings.tolerance:g})"
        return f"reached max_iterations={self.settings.max_iterations} without converging"

    def elbo_table(self) -> pd.DataFrame:
        """Loss per step, plus the fixed-cells ELBO of the checks at the steps they were taken."""
        table = pd.DataFrame({"iteration": np.arange(1, self.steps + 1), "loss": self.losses})
        table["eval_elbo"] = table["iteration"].map(dict(self.checks))
        return table

    def statistics(self) -> dict:
        """How the fit went and the settings it ran with, as plain values (JSON and netCDF safe)."""
        ran_with = {key: value for key, value in asdict(self.settings).items()
                    if value is not None and key not in ("log_every_seconds", "checkpoint_minutes")}
        return {
            "engine": self.engine,
            "backend": self.backend,
            "steps": self.steps,
            "epochs": float(self.epochs),
            "converged": int(self.converged),
            "stop_reason": self.stop_reason,
            "fit_seconds": float(self.fit_seconds),
            "compile_seconds": float(self.compile_seconds),
            "ms_per_step": 1000 * self.fit_seconds / max(self.steps, 1),
            "final_loss": float(np.mean(self.losses[-100:])),
            "final_eval_elbo": float(self.checks[-1][1]) if self.checks else None,
            "decays": int(self.decays),
            "final_learning_rate": float(self.final_learning_rate),
            **ran_with,
        }
