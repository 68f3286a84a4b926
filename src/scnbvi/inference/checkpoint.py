"""Checkpoints of a running fit, so a fit killed by a time limit, a preemption or a node failure
resumes where it was instead of starting over.

A checkpoint is written every ``every_seconds`` and when the process is asked to stop
(SIGTERM, which SLURM sends before its time limit, or SIGINT); the fit then ends with
:class:`FitInterrupted`. It holds everything the next steps depend on (variational parameters,
optimiser state, stopping rule, iterate average, sampler position, ELBO history), so the
resumed fit gives the same numbers as one that was never interrupted. It is used only by a fit
with the same fingerprint: the same counts, offsets, covariates, model and settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from scnbvi.errors import ScnbviError
from scnbvi.inference.settings import InferenceSettings
from scnbvi.outputs import source_hash

log = logging.getLogger("scnbvi")

# Settings that change how a fit reports or saves itself, not its numbers.
NOT_FINGERPRINTED = ("log_every_seconds", "checkpoint_minutes", "memory_limit_gb")


class FitInterrupted(ScnbviError):
    """The fit was asked to stop; its progress is saved and the same command resumes it."""


def fingerprint(counts_digest: str, arrays: dict, settings: InferenceSettings, options: dict) -> str:
    """What a fit's numbers depend on, hashed, the package's code included: a checkpoint of any
    other fit, or of another version of the engine (whose saved state may differ), is never used.
    ``counts_digest``: the counts' (:class:`scnbvi.cell_rows.FitStatistics`)."""
    digest = hashlib.sha256((source_hash() + counts_digest).encode())
    for array in (np.asarray(a) for a in arrays.values()):
        digest.update(np.ascontiguousarray(array).tobytes())
    fixed = {k: v for k, v in asdict(settings).items() if k not in NOT_FINGERPRINTED}
    digest.update(repr((sorted(fixed.items()), sorted(options.items()), list(arrays))).encode())
    return digest.hexdigest()


class Checkpoint:
    """Where a fit saves its progress, when, and whether a saved one belongs to it."""

    def __init__(self, path, fingerprint: str, every_seconds: float):
        self.path, self.fingerprint, self.every_seconds = Path(path), fingerprint, every_seconds
        self.stop_requested: str | None = None
        self.last_save = time.monotonic()

    def load(self) -> dict | None:
        """The saved progress of this very fit, else None (a foreign checkpoint is ignored)."""
        if not self.path.is_file():
            return None
        try:
            saved = pickle.loads(self.path.read_bytes())
        except Exception as error:  # a truncated or foreign file is not worth a failed job
            log.warning("ignoring unreadable checkpoint %s (%s)", self.path, error)
            return None
        if saved.get("fingerprint") != self.fingerprint:
            log.info("ignoring checkpoint %s: it belongs to another input or configuration", self.path)
            return None
        log.info("resuming from checkpoint %s at step %d", self.path, saved["progress"]["steps"])
        return saved["progress"]

    def due(self) -> bool:
        return self.stop_requested is not None or time.monotonic() - self.last_save >= self.every_seconds

    def save(self, progress: dict) -> None:
        """Write atomically, so a kill while saving leaves the previous checkpoint intact. A
        failed write (a full disk, a read-only directory) costs only the checkpoint: the fit
        goes on, with one warning."""
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(pickle.dumps({"fingerprint": self.fingerprint, "progress": progress}))
            os.replace(temporary, self.path)
            saved = True
        except OSError as error:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            log.warning("checkpoint not saved to %s (%s); the fit goes on without it", self.path,
                        error.strerror or error)
            saved = False
        self.last_save = time.monotonic()
        if self.stop_requested:
            where = f"its progress is saved in {self.path}" if saved else "its progress could not be saved"
            raise FitInterrupted(
                f"fit stopped by {self.stop_requested} at step {progress['steps']}; {where}; fix: rerun the same "
                "command to resume (a longer time limit avoids the stop)"
            )

    @contextlib.contextmanager
    def stop_on_signals(self):
        """SIGTERM and SIGINT ask the fit to save and stop at its next chunk of steps."""
        signals = (signal.SIGTERM, signal.SIGINT)
        try:
            previous = {number: signal.signal(number, self._request_stop) for number in signals}
        except ValueError:  # not the main thread: signals cannot be caught here
            yield
            return
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _request_stop(self, number, frame) -> None:
        self.stop_requested = signal.Signals(number).name


def remove_checkpoint(path) -> None:
    """Called once the fit's results are written, never before: until then a rerun resumes from it.
    A checkpoint that cannot be removed (results made read-only) is only reported."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not remove the finished fit's checkpoint %s (%s); delete it by hand", path,
                    error.strerror or error)
