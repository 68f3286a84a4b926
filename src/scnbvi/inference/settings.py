"""What a fit is asked to do and what it really runs with."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


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
