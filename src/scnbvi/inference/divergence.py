"""The error of a fit whose loss stopped being finite, with the advice that can help."""

from __future__ import annotations

from scnbvi.errors import DivergenceError
from scnbvi.inference.settings import InferenceSettings


def divergence_error(step: int, settings: InferenceSettings) -> DivergenceError:
    """The fit checked its inputs before starting (finite counts, offsets and covariates), so
    a non-finite loss comes from steps too large for this data."""
    return DivergenceError(
        f"ADVI diverged at step {step} (loss is not finite; counts, offsets and covariates are finite, so the "
        f"steps were too large) with learning_rate={settings.learning_rate:g}; fix: lower "
        f"inference.learning_rate (e.g. {settings.learning_rate / 10:g})"
    )
