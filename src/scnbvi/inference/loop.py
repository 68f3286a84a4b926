"""The fit loop both engines run: steps in chunks, convergence checks, learning-rate decays,
the stop, iterate averaging, progress lines and checkpoints, written once.

An engine brings an :class:`Engine`, plain functions over a state of its own (in the manner of
numpyro's ``SVI`` and blackjax's ``meanfield_vi``): the loop never looks inside that state, so a
change of policy is made here for both engines.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any, Callable, NamedTuple

import numpy as np

from scnbvi.batches import BatchSampler
from scnbvi.inference.averaging import IterateAverage
from scnbvi.inference.checkpoint import Checkpoint
from scnbvi.inference.divergence import divergence_error
from scnbvi.inference.plateau import learning_rate, stopping_rule
from scnbvi.inference.progress import Progress
from scnbvi.inference.result import FitResult
from scnbvi.inference.settings import InferenceSettings


class Engine(NamedTuple):
    """An engine's part of a fit, as functions of its state.

    ``run_chunk(state, first_step, length, learning_rate)`` takes ``length`` steps (at most
    ``chunk_steps``) from step ``first_step`` on the minibatches it draws, and returns the new
    state, the sum of its steps' iterates (``None`` when the fit does not average) and the
    losses, which may still be computing on a device: ``read_losses`` waits for them and
    returns -ELBO estimates on the host.
    """

    name: str
    chunk_steps: int
    run_chunk: Callable
    read_losses: Callable[[Any], np.ndarray]
    iterate: Callable  # state -> the parameters the iterate average follows
    flat_parameters: Callable[[Any], np.ndarray]  # state -> every variational parameter (the parameters rule)
    evaluate: Callable[[Any, Any], float] | None  # (state, averaged iterate) -> fixed-cells ELBO (the elbo rule)
    fitted: Callable  # (state, final iterate) -> (means, sds) by variable
    save: Callable  # state -> host values a checkpoint can pickle
    restore: Callable  # (state, saved values) -> state


class FitLoop:
    """The schedule of one fit; :meth:`run` drives an engine from its initial state to a result.

    A chunk of steps ends at each check. The losses of a chunk are read once the next chunk is
    queued (so an engine on a device computes one chunk while the next is staged, never more),
    at a check and before a checkpoint; a non-finite one stops the fit at its step.
    """

    def __init__(self, engine: Engine, sampler: BatchSampler, settings: InferenceSettings, backend: str,
                 checkpoint: Checkpoint | None):
        self.engine, self.sampler, self.settings = engine, sampler, settings
        self.backend, self.checkpoint = backend, checkpoint
        self.averaging = settings.convergence == "elbo"
        self.rule, self.average = stopping_rule(settings), IterateAverage()
        self.progress = Progress(settings, sampler.steps_per_epoch, sampler.n_cells * sampler.n_genes)
        self.steps, self.losses, self.checks, self.converged = 0, [], [], False
        self.unread = None  # the losses of the last chunk, not read yet

    def run(self, state, setup_seconds: float) -> FitResult:
        """Steps until the rule stops the fit or ``max_iterations``; ``setup_seconds`` (the
        engine's compilation before the first step) counts as compile time, as does the first chunk."""
        settings, engine = self.settings, self.engine
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is not None:
            state = self.restore(state, saved)
        compile_seconds, first_step = setup_seconds, self.steps
        start = time.perf_counter()
        with self.checkpoint.stop_on_signals() if self.checkpoint is not None else contextlib.nullcontext():
            while self.steps < settings.max_iterations and not self.converged:
                length = min(engine.chunk_steps, settings.max_iterations - self.steps,
                             settings.check_every - self.steps % settings.check_every)
                state, iterate_sum, losses = engine.run_chunk(state, self.steps, length,
                                                              learning_rate(settings, self.rule))
                if self.steps == first_step:
                    compile_seconds += time.perf_counter() - start  # the first call compiles
                    start = time.perf_counter()
                if self.averaging:
                    self.average.add_sum(iterate_sum, length)
                self.read_unread()
                self.steps += length
                self.unread = losses
                if self.steps % settings.check_every == 0:
                    self.check(state)
                else:
                    self.progress.step(self.steps, lambda: engine.read_losses(losses)[-1])
                if self.checkpoint is not None and not self.converged and self.checkpoint.due():
                    self.read_unread()
                    self.checkpoint.save(self.progress_so_far(state))
        self.read_unread()
        if self.checkpoint is not None and self.steps > first_step:
            # The finished fit too, until its caller has written the results (remove_checkpoint).
            self.checkpoint.save(self.progress_so_far(state))
        last_iterate = engine.iterate(state)
        means, stds = engine.fitted(state, self.average.result(last_iterate) if self.averaging else last_iterate)
        losses = np.concatenate(self.losses)
        return FitResult(
            means=means,
            stds=stds,
            losses=losses,
            checks=self.checks,
            epochs=len(losses) / self.sampler.steps_per_epoch,
            converged=self.converged,
            fit_seconds=time.perf_counter() - start,
            compile_seconds=compile_seconds,
            engine=engine.name,
            backend=self.backend,
            settings=settings,
            decays=self.rule.decays,
            final_learning_rate=learning_rate(settings, self.rule),
        )

    def read_unread(self) -> None:
        """Take the last chunk's losses to the host; a non-finite one is a divergence at its step.
        The unread chunk ends at step ``self.steps`` wherever this is called."""
        if self.unread is None:
            return
        losses, self.unread = self.engine.read_losses(self.unread), None
        if not np.all(np.isfinite(losses)):
            raise divergence_error(self.steps - len(losses) + int(np.argmax(~np.isfinite(losses))) + 1, self.settings)
        self.losses.append(losses)

    def check(self, state) -> None:
        """Judge the fit: the ``elbo`` rule on the fixed-cells ELBO of the window's average
        (whose plateaus also shrink the learning rate), the ``parameters`` rule on the last iterate."""
        self.read_unread()
        if self.averaging:
            self.checks.append((self.steps, self.engine.evaluate(state, self.average.close_window())))
            self.converged = self.rule.update(self.checks[-1][1])
        else:
            self.converged = self.rule.update(self.engine.flat_parameters(state))
        self.progress.check(self.steps, self.losses[-1][-1], self.rule)

    def progress_so_far(self, state) -> dict:
        """Everything the next steps depend on, as host values."""
        return {
            "steps": self.steps, "losses": np.concatenate(self.losses), "checks": list(self.checks),
            "converged": self.converged, "state": self.engine.save(state), "rule": copy.deepcopy(vars(self.rule)),
            "average": self.average.snapshot(), "sampler": self.sampler.get_state(),
        }

    def restore(self, state, saved: dict):
        """The fit put back where a checkpoint left it; returns the engine's state."""
        self.steps, self.checks, self.converged = saved["steps"], list(saved["checks"]), saved["converged"]
        self.losses = [np.asarray(saved["losses"])]
        self.rule.__dict__.update(copy.deepcopy(saved["rule"]))
        self.average.restore(saved["average"])
        self.sampler.set_state(saved["sampler"])
        return self.engine.restore(state, saved["state"])
