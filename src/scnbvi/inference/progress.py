"""Plain progress lines that read well in a batch job's log."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("scnbvi")


class Progress:
    """Step, epoch, loss, rate and ETA, at most every ``every_seconds`` unless forced."""

    def __init__(self, total: int, steps_per_epoch: float, every_seconds: float):
        self.total, self.steps_per_epoch, self.every = total, steps_per_epoch, every_seconds
        self.start = self.last = time.perf_counter()

    def maybe_log(self, step: int, loss: float, elbo: float | None = None, force=False):
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = step / max(now - self.start, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        extra = "" if elbo is None else f" eval_elbo {elbo:.6g}"
        log.info(
            "step %d/%d epoch %.2f loss %.6g%s %.1f it/s eta(max) %s",
            step, self.total, step / self.steps_per_epoch, loss, extra, rate, _clock(eta),
        )


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
