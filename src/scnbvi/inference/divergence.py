"""The error of a fit whose loss stopped being finite, with the advice that can help."""

from __future__ import annotations

from scnbvi.errors import DivergenceError
from scnbvi.inference.settings import InferenceSettings


def divergence_error(step: int, settings: InferenceSettings) -> DivergenceError:
    return DivergenceError(
        f"ADVI diverged at step {step} (loss is not finite) with learning_rate="
        f"{settings.learning_rate:g}; fix: lower inference.learning_rate (e.g. "
        f"{settings.learning_rate / 10:g})"
    )
