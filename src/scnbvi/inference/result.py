"""What came out of a fit: the fitted Gaussian, its loss history and how it stopped."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from scnbvi.inference.settings import InferenceSettings


@dataclass
class FitResult:
    """The fitted mean-field Gaussian (unconstrained space) and how the fit went.

    ``settings`` are the effective ones (see :func:`scnbvi.inference.settings.effective_settings`);
    ``decays`` is how often a plateau shrank the learning rate, ending at ``final_learning_rate``.
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
