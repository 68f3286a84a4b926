"""Progress lines of a running fit, readable in a terminal and in a batch job's log.

They go to the ``scnbvi.progress`` logger, which the workflow's scripts also show on the
terminal. The rate counts only steps after the first (compilation excluded), and the ETA is
to the stopping rule's likely stop, estimated from how fast the ELBO's gains shrink, not to
``max_iterations``.
"""

from __future__ import annotations

import logging
import math
import time

from scnbvi.inference.plateau import learning_rate, relative_gains
from scnbvi.inference.settings import InferenceSettings

log = logging.getLogger("scnbvi.progress")


class Progress:
    """Logs a line at each check (and between checks at most every ``log_every_seconds``)."""

    def __init__(self, settings: InferenceSettings, steps_per_epoch: float, observations: int):
        self.settings, self.steps_per_epoch = settings, steps_per_epoch
        self.observations = max(observations, 1)
        self.first = None  # (time, step) of the first step that ran compiled code
        self.last_line = time.perf_counter()
        self.decays = 0

    def step(self, step: int, loss) -> None:
        """After a step between checks; ``loss`` may be a function, called only when a line
        is due (an engine then need not wait for its device on every step)."""
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, step)
        if now - self.last_line >= self.settings.log_every_seconds:
            self._line(step, loss() if callable(loss) else loss, "")

    def check(self, step: int, loss: float, rule) -> None:
        """A line after a convergence check, and one for each learning-rate decay it took."""
        if self.first is None:
            self.first = (time.perf_counter(), step)
        if rule.decays > self.decays:
            self.decays = rule.decays
            log.info("step %d: ELBO plateau, learning rate x%g -> %g (decay %d of %d)", step,
                     self.settings.learning_rate_decay, learning_rate(self.settings, rule),
                     rule.decays, rule.max_decays)
        history = getattr(rule, "history", [])
        extra = ""
        if history:
            extra = f" fixed-cells ELBO {history[-1]:.7g}"
            gains = relative_gains(history, self.settings.patience)
            if gains:
                extra += f" (gain {gains[-1]:.2g}, stops below {self.settings.tolerance:g})"
        self._line(step, loss, extra, self._eta(step, rule))

    def _line(self, step: int, loss: float, extra: str, eta: str = "") -> None:
        self.last_line = time.perf_counter()
        log.info("step %d epoch %.1f ELBO/obs %.5g%s %s%s", step, step / self.steps_per_epoch,
                 -loss / self.observations, extra, self._rate(step), eta)

    def _rate(self, step: int) -> str:
        if self.first is None or step <= self.first[1]:
            return "(compiling)"
        return f"{(step - self.first[1]) / max(time.perf_counter() - self.first[0], 1e-9):.0f} steps/s"

    def _eta(self, step: int, rule) -> str:
        """Time to the stop the rule will likely make: the gains shrink about geometrically,
        and each decay left needs about ``patience`` more checks to reach its plateau."""
        history = getattr(rule, "history", None)
        if history is None or self.first is None or step <= self.first[1]:
            return ""
        gains = relative_gains(history, self.settings.patience)
        checks = None
        if len(gains) >= 2 and 0 < gains[-1] < gains[-2] and self.settings.tolerance > 0:
            shrink = gains[-1] / gains[-2]
            checks = max(0.0, math.log(self.settings.tolerance / gains[-1]) / math.log(shrink))
        elif gains and gains[-1] < self.settings.tolerance:
            checks = 0.0
        if checks is None:
            return ", eta: after more checks"
        checks += (rule.max_decays - rule.decays) * self.settings.patience + 1
        steps = min(checks * self.settings.check_every, self.settings.max_iterations - step)
        rate = (step - self.first[1]) / max(time.perf_counter() - self.first[0], 1e-9)
        return f", eta ~{_clock(steps / max(rate, 1e-9))} to convergence (estimated)"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
