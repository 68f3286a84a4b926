"""ADVI through ``pm.fit`` on a PyTensor backend (``c``, ``numba`` or the pure-Python ``py``)."""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import pymc as pm
import pytensor

from scnbvi.batches import BatchSampler
from scnbvi.inference.averaging import IterateAverage
from scnbvi.inference.backends import pytensor_mode
from scnbvi.inference.checkpoint import Checkpoint
from scnbvi.inference.divergence import divergence_error
from scnbvi.inference.elbo import ParameterLayout, evaluation_cells, fixed_normal_draws, gaussian_entropy
from scnbvi.inference.initialization import initial_std
from scnbvi.inference.plateau import stopping_rule
from scnbvi.inference.progress import Progress
from scnbvi.inference.settings import FitResult, InferenceSettings
from scnbvi.model import load_batch

log = logging.getLogger("scnbvi")


def fixed_cells_elbo(model: pm.Model, sampler: BatchSampler, settings: InferenceSettings, layout: ParameterLayout, mode):
    """The ELBO on a fixed block of cells with fixed draws, as a function of (means, sds).

    It loads its block into the model's data containers: the caller reloads a training block.
    """
    eval_batch = sampler.evaluation_batch(evaluation_cells(settings, sampler.n_genes), settings.seed)
    draws = fixed_normal_draws(settings.eval_samples, layout.size, settings.seed)
    logp = model.compile_logp(jacobian=True, mode=mode)

    def evaluate(mean: np.ndarray, std: np.ndarray) -> float:
        load_batch(model, eval_batch)
        return float(np.mean([logp(layout.split(mean + std * eps)) for eps in draws])) + gaussian_entropy(std)

    return evaluate


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """Hide ``pm.fit``'s own summary ("Interrupted at ... [0%]" ends a converged fit)."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run(model: pm.Model, sampler: BatchSampler, settings: InferenceSettings, backend: str,
        checkpoint: Checkpoint | None = None) -> FitResult:
    if checkpoint is not None:
        # pm.fit keeps its optimiser state inside its compiled step; only the jax engine resumes.
        log.info("the pymc engine writes no checkpoints: a killed fit starts over (backend jax resumes)")
    mode = pytensor_mode(backend)
    layout = ParameterLayout.from_model(model)
    averaging = settings.convergence == "elbo"
    rule = stopping_rule(settings)
    progress = Progress(settings, sampler.steps_per_epoch, sampler.n_cells * sampler.n_genes)

    t0 = time.perf_counter()
    evaluate = fixed_cells_elbo(model, sampler, settings, layout, mode) if averaging else None
    with model:
        advi = pm.ADVI(
            random_seed=settings.seed,
            start_sigma={name: np.full(int(np.prod(shape)), initial_std(settings)) for name, shape in zip(layout.names, layout.shapes)},
        )
    group = advi.approx.groups[0]
    order = [group.ordering[name][1] for name in layout.names]
    compile_seconds = time.perf_counter() - t0

    def raw_params() -> np.ndarray:
        return np.concatenate([group.params_dict["mu"].get_value(), group.params_dict["rho"].get_value()])

    def means_and_stds(flat: np.ndarray):
        mean_flat, rho_flat = np.split(flat, 2)
        mean = np.concatenate([mean_flat[o] for o in order])
        std = np.log1p(np.exp(np.concatenate([rho_flat[o] for o in order])))
        return mean, std

    average = IterateAverage()
    learning_rate = pytensor.shared(settings.learning_rate, name="learning_rate")
    losses: list[float] = []  # pm.fit drops the converging step's loss from its own history
    checks: list[tuple[int, float]] = []
    timing = {"start": time.perf_counter()}
    state = {"converged": False}

    def after_step(approx, step_losses, step):
        if step == 1:
            timing["first_step"] = time.perf_counter()
        losses.append(float(step_losses[-1]))
        if averaging:
            average.add(raw_params())
        if step % settings.check_every == 0:
            if averaging:
                checks.append((step, evaluate(*means_and_stds(average.close_window()))))
                done = rule.update(checks[-1][1])
                learning_rate.set_value(settings.learning_rate * rule.learning_rate_scale)
            else:
                done = rule.update(raw_params())
            progress.check(step, losses[-1], rule)
            if done:
                state["converged"] = True
                raise StopIteration
        else:
            progress.step(step, losses[-1])
        # Last, after any check has loaded the evaluation cells: the next step trains on a drawn block.
        load_batch(model, sampler.next())

    load_batch(model, sampler.next())
    timing["start"] = time.perf_counter()
    with model, _quiet(logging.getLogger("pymc.variational.inference")):
        try:
            pm.fit(
                n=settings.max_iterations,
                method=advi,
                obj_optimizer=pm.adam(learning_rate=learning_rate),
                callbacks=[after_step],
                progressbar=False,
                compile_kwargs={"mode": mode},
            )
        except FloatingPointError as err:
            raise divergence_error(len(losses) + 1, settings) from err
    first_step = timing.get("first_step", timing["start"])
    compile_seconds += first_step - timing["start"]
    mean, std = means_and_stds(average.result(raw_params()) if averaging else raw_params())
    return FitResult(
        means=layout.split(mean),
        stds=layout.split(std),
        losses=np.asarray(losses),
        checks=checks,
        epochs=len(losses) / sampler.steps_per_epoch,
        converged=state["converged"],
        fit_seconds=time.perf_counter() - first_step,
        compile_seconds=compile_seconds,
        engine="pymc",
        backend=backend,
        settings=settings,
        decays=rule.decays,
        final_learning_rate=settings.learning_rate * rule.learning_rate_scale,
    )
