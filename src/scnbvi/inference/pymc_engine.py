"""ADVI with PyMC's own step function on a PyTensor backend (``c``, ``numba`` or the pure-Python
``py``), in a loop of ours so that a checkpoint can save and restore the whole optimiser state."""

from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import pymc as pm
import pytensor

from scnbvi.batches import BATCH_LAYOUT, BatchSampler
from scnbvi.inference.averaging import IterateAverage
from scnbvi.inference.backends import pytensor_mode
from scnbvi.inference.checkpoint import Checkpoint, restore_schedule
from scnbvi.inference.divergence import divergence_error
from scnbvi.inference.elbo import ParameterLayout, evaluation_cells, fixed_normal_draws, gaussian_entropy
from scnbvi.inference.initialization import initial_std
from scnbvi.inference.plateau import stopping_rule
from scnbvi.inference.progress import Progress
from scnbvi.inference.settings import FitResult, InferenceSettings
from scnbvi.model import load_batch


def fixed_cells_elbo(model: pm.Model, sampler: BatchSampler, settings: InferenceSettings, layout: ParameterLayout, mode):
    """The ELBO on a fixed block of cells with fixed draws, as a function of (means, sds).

    It loads its block into the model's data containers: every step loads its own block first.
    """
    eval_batch = sampler.evaluation_batch(evaluation_cells(settings, sampler.n_genes), settings.seed)
    draws = fixed_normal_draws(settings.eval_samples, layout.size, settings.seed)
    logp = model.compile_logp(jacobian=True, mode=mode)

    def evaluate(mean: np.ndarray, std: np.ndarray) -> float:
        load_batch(model, eval_batch)
        return float(np.mean([logp(layout.split(mean + std * eps)) for eps in draws])) + gaussian_entropy(std)

    return evaluate


def run(model: pm.Model, sampler: BatchSampler, settings: InferenceSettings, backend: str,
        checkpoint: Checkpoint | None = None) -> FitResult:
    mode = pytensor_mode(backend)
    layout = ParameterLayout.from_model(model)
    averaging = settings.convergence == "elbo"
    rule = stopping_rule(settings)
    progress = Progress(settings, sampler.steps_per_epoch, sampler.n_cells * sampler.n_genes)

    t0 = time.perf_counter()
    evaluate = fixed_cells_elbo(model, sampler, settings, layout, mode) if averaging else None
    learning_rate = pytensor.shared(settings.learning_rate, name="learning_rate")
    with model:
        advi = pm.ADVI(
            random_seed=settings.seed,
            start_sigma={name: np.full(int(np.prod(shape)), initial_std(settings)) for name, shape in zip(layout.names, layout.shapes)},
        )
        # PyMC's own step (the one pm.fit loops over), driven here so that its state can be saved.
        step_function = advi.objective.step_function(
            score=True, obj_optimizer=pm.adam(learning_rate=learning_rate), compile_kwargs={"mode": mode})
    group = advi.approx.groups[0]
    order = [group.ordering[name][1] for name in layout.names]
    containers = {model[name] for name in BATCH_LAYOUT[sampler.mode]} | {learning_rate}
    # Variational parameters, Adam's moments and step count, and the Monte-Carlo generator.
    fit_state = [v for v in step_function.get_shared() if v not in containers]
    compile_seconds = time.perf_counter() - t0

    def raw_params() -> np.ndarray:
        return np.concatenate([group.params_dict["mu"].get_value(), group.params_dict["rho"].get_value()])

    def means_and_stds(flat: np.ndarray):
        mean_flat, rho_flat = np.split(flat, 2)
        mean = np.concatenate([mean_flat[o] for o in order])
        std = np.log1p(np.exp(np.concatenate([rho_flat[o] for o in order])))
        return mean, std

    average = IterateAverage()
    losses: list[float] = []
    checks: list[tuple[int, float]] = []
    converged = False
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        losses, checks, converged = list(saved["losses"]), list(saved["checks"]), saved["converged"]
        for variable, value in zip(fit_state, saved["state"]):
            variable.set_value(copy.deepcopy(value))
        restore_schedule(saved, rule, average, sampler)
        learning_rate.set_value(settings.learning_rate * rule.learning_rate_scale)

    def progress_so_far() -> dict:
        return {
            "steps": len(losses), "losses": np.asarray(losses), "checks": list(checks), "converged": converged,
            "state": [copy.deepcopy(v.get_value()) for v in fit_state],
            "rule": copy.deepcopy(vars(rule)), "average": copy.deepcopy(vars(average)),
            "sampler": sampler.get_state(),
        }

    first_step = len(losses)
    start = time.perf_counter()
    with checkpoint.stop_on_signals() if checkpoint is not None else contextlib.nullcontext():
        while len(losses) < settings.max_iterations and not converged:
            load_batch(model, sampler.next())
            loss = float(step_function())
            if len(losses) == first_step:
                compile_seconds += time.perf_counter() - start  # the first call compiles
                start = time.perf_counter()
            if not np.isfinite(loss):
                raise divergence_error(len(losses) + 1, settings)
            losses.append(loss)
            step = len(losses)
            if averaging:
                average.add(raw_params())
            if step % settings.check_every == 0:
                if averaging:
                    checks.append((step, evaluate(*means_and_stds(average.close_window()))))
                    converged = rule.update(checks[-1][1])
                    learning_rate.set_value(settings.learning_rate * rule.learning_rate_scale)
                else:
                    converged = rule.update(raw_params())
                progress.check(step, loss, rule)
            else:
                progress.step(step, loss)
            if checkpoint is not None and not converged and checkpoint.due():
                checkpoint.save(progress_so_far())
    mean, std = means_and_stds(average.result(raw_params()) if averaging else raw_params())
    return FitResult(
        means=layout.split(mean),
        stds=layout.split(std),
        losses=np.asarray(losses),
        checks=checks,
        epochs=len(losses) / sampler.steps_per_epoch,
        converged=converged,
        fit_seconds=time.perf_counter() - start,
        compile_seconds=compile_seconds,
        engine="pymc",
        backend=backend,
        settings=settings,
        decays=rule.decays,
        final_learning_rate=settings.learning_rate * rule.learning_rate_scale,
    )
