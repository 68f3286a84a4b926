"""ADVI with PyMC's own step function on a PyTensor backend (``c``, ``numba`` or the pure-Python
``py``), in a loop of ours so that a checkpoint can save and restore the whole optimiser state."""

from __future__ import annotations

import copy
import time

import numpy as np
import pymc as pm
import pytensor

from scnbvi.batches import BATCH_LAYOUT, BatchSampler
from scnbvi.inference.backends import pytensor_mode
from scnbvi.inference.checkpoint import Checkpoint
from scnbvi.inference.elbo import ParameterLayout, evaluation_cells, fixed_normal_draws, gaussian_entropy
from scnbvi.inference.initialization import initial_std
from scnbvi.inference.loop import Engine, FitLoop
from scnbvi.inference.result import FitResult
from scnbvi.inference.settings import InferenceSettings
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
    start = time.perf_counter()
    engine = build_engine(model, sampler, settings, pytensor_mode(backend))
    return FitLoop(engine, sampler, settings, backend, checkpoint).run(None, time.perf_counter() - start)


def build_engine(model: pm.Model, sampler: BatchSampler, settings: InferenceSettings, mode) -> Engine:
    """PyMC's own step (the one ``pm.fit`` loops over), one step a chunk, so that progress lines
    and checkpoints come between any two steps. Its state lives in PyTensor shared variables:
    the loop's state is ``None``, and a checkpoint saves the variables' values."""
    layout = ParameterLayout.from_model(model)
    averaging = settings.convergence == "elbo"
    evaluate = fixed_cells_elbo(model, sampler, settings, layout, mode) if averaging else None
    rate = pytensor.shared(settings.learning_rate, name="learning_rate")
    with model:
        advi = pm.ADVI(
            random_seed=settings.seed,
            start_sigma={name: np.full(int(np.prod(shape)), initial_std(settings))
                         for name, shape in zip(layout.names, layout.shapes)},
        )
        step_function = advi.objective.step_function(
            score=True, obj_optimizer=pm.adam(learning_rate=rate), compile_kwargs={"mode": mode})
    group = advi.approx.groups[0]
    order = [group.ordering[name][1] for name in layout.names]
    containers = {model[name] for name in BATCH_LAYOUT[sampler.mode]} | {rate}
    # Variational parameters, Adam's moments and step count, and the Monte-Carlo generator.
    fit_state = [v for v in step_function.get_shared() if v not in containers]

    def raw_params(state) -> np.ndarray:
        return np.concatenate([group.params_dict["mu"].get_value(), group.params_dict["rho"].get_value()])

    def means_and_stds(flat: np.ndarray):
        mean_flat, rho_flat = np.split(flat, 2)
        mean = np.concatenate([mean_flat[o] for o in order])
        std = np.log1p(np.exp(np.concatenate([rho_flat[o] for o in order])))
        return mean, std

    def run_chunk(state, first_step: int, length: int, learning_rate: float):
        if rate.get_value(borrow=True) != learning_rate:
            rate.set_value(learning_rate)
        losses, iterate_sum = np.empty(length), None
        for index in range(length):
            load_batch(model, sampler.next())
            losses[index] = float(step_function())
            if averaging:
                iterate_sum = raw_params(state) if iterate_sum is None else iterate_sum + raw_params(state)
        return state, iterate_sum, losses

    def fitted(state, flat: np.ndarray):
        mean, std = means_and_stds(flat)
        return layout.split(mean), layout.split(std)

    def restore(state, values):
        for variable, value in zip(fit_state, values):
            variable.set_value(copy.deepcopy(value))
        return state

    return Engine(
        name="pymc",
        chunk_steps=1,
        run_chunk=run_chunk,
        read_losses=np.asarray,
        iterate=raw_params,
        flat_parameters=raw_params,
        evaluate=(lambda state, window: evaluate(*means_and_stds(window))) if averaging else None,
        fitted=fitted,
        save=lambda state: [copy.deepcopy(v.get_value()) for v in fit_state],
        restore=restore,
    )
