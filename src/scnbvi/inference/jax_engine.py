"""ADVI in jitted optax loops over the model's JAX log density (:mod:`scnbvi.inference.jax_objective`).

``init`` builds an :class:`ADVIState`, ``step`` is one optimiser step, ``run_chunk`` scans steps
in one jitted program, and ``run`` hands them, with the checks' ELBO and the closing sweep
(:mod:`scnbvi.inference.closing_sweep`), to the fit loop.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import pymc as pm

from scnbvi.batches import BatchSampler, block_capacity
from scnbvi.compilation_cache import use_compilation_cache
from scnbvi.inference.checkpoint import Checkpoint
from scnbvi.inference.closing_sweep import closing_refit, compile_sweep, refit_every_cell, sweep_block_size
from scnbvi.inference.elbo import evaluation_cells, fixed_normal_draws
from scnbvi.inference.initialization import initial_std
from scnbvi.inference.jax_objective import Objective, objective, repeat_refit
from scnbvi.inference.loop import Engine, FitLoop
from scnbvi.inference.result import FitResult
from scnbvi.inference.settings import InferenceSettings


class ADVIState(NamedTuple):
    """Variational parameters and optimiser state.

    ``params``: ``mean`` and ``log_sd`` of the global parameters (flat, in the layout's order),
    ``cell_mean`` and ``cell_log_sd`` of the per-cell variable.
    """

    params: dict
    opt_state: Any


def init(model: pm.Model, target: Objective, std: float, optimizer) -> ADVIState:
    """q centred on the model's initial point, every factor with sd ``std``."""
    import jax.numpy as jnp

    point = model.initial_point()
    log_sd = math.log(std)
    # Explicit dtypes: a weakly typed array would change type after the first step, and each
    # change recompiles the chunk program (seconds each).
    params = {
        "mean": jnp.asarray(target.layout.flatten(point), dtype=float),
        "log_sd": jnp.full(target.layout.size, log_sd, dtype=float),
        "cell_mean": jnp.asarray(point[target.cell_name], dtype=float),
        "cell_log_sd": jnp.full(target.n_cells, log_sd, dtype=float),
    }
    return ADVIState(params, optimizer.init(trained(target, params)))


def trained(target: Objective, params: dict) -> dict:
    """The params the optimiser moves (and the iterate average follows)."""
    return {name: params[name] for name in target.trained}


def step(target: Objective, optimizer, learning_rate, state: ADVIState, noise, batch):
    """One ADVI step on one minibatch with its standard normal ``noise`` (global, cells);
    returns the new state and the step's loss (-ELBO)."""
    import jax
    import optax

    dtype = state.params["mean"].dtype
    noise = tuple(n.astype(dtype) for n in noise)
    params = state.params if target.refit_cells is None else target.refit_cells(state.params, batch)
    moved = trained(target, params)
    loss, grads = jax.value_and_grad(lambda t: -target.step_elbo({**params, **t}, *noise, batch))(moved)
    updates, opt_state = optimizer.update(grads, state.opt_state, moved)
    moved = optax.apply_updates(moved, jax.tree.map(lambda u: learning_rate * u, updates))
    return ADVIState({**params, **moved}, opt_state), loss


def step_noise(key, n_global: int, n_read: int, step_index):
    """The standard normal draws of one step, keyed by its index (a rerun, or a resumed fit,
    draws the same). float32 noise is ample for a Monte-Carlo gradient and several times
    cheaper on CPU."""
    import jax
    import jax.numpy as jnp

    global_key, cell_key = jax.random.split(jax.random.fold_in(key, step_index))
    return jax.random.normal(global_key, (n_global,), jnp.float32), jax.random.normal(cell_key, (n_read,), jnp.float32)


def run_chunk(target: Objective, optimizer, key, averaging: bool, state: ADVIState, first_step, batches, learning_rate):
    """Consecutive steps in one ``lax.scan``; returns the state, the sum of the trained
    params' iterates (for the iterate average, when ``averaging``) and the losses.

    The chunk's noise is drawn before the scan, in one vectorised call: drawn inside each
    step, the random number generator's small loops took up to a quarter of a small step on CPU."""
    import jax
    import jax.numpy as jnp

    one_step = partial(step, target, optimizer, learning_rate)

    def scan_step(carry, inputs):
        state, total = carry
        state, loss = one_step(state, *inputs)
        if averaging:
            total = jax.tree.map(jnp.add, total, trained(target, state.params))
        return (state, total), loss

    steps = first_step + jnp.arange(batches["cell_index"].shape[0])
    noise = jax.vmap(partial(step_noise, key, target.layout.size, batches["cell_index"].shape[1]))(steps)
    total = jax.tree.map(jnp.zeros_like, trained(target, state.params)) if averaging else None
    (state, total), losses = jax.lax.scan(scan_step, (state, total), (noise, batches))
    return state, total, losses


def chunk_length(sampler: BatchSampler, settings: InferenceSettings, noise_size: int,
                 budget_bytes: float = 256e6) -> int:
    """Steps per jitted scan: one check interval, split so that the staged batches and the
    steps' noise (``noise_size`` float32 values a step) fit the budget."""
    if sampler.mode == "cells":
        block_nnz = sampler.rows.nnz / sampler.n_cells * sampler.batch_size
        bytes_per_step = 2 * 16 * max(block_nnz, 1024) + 4 * sampler.batch_size
    else:
        bytes_per_step = 16 * sampler.batch_size
    bytes_per_step += 4 * noise_size
    pieces = max(1, math.ceil(settings.check_every * bytes_per_step / budget_bytes))
    return max(1, settings.check_every // pieces)


def run(model: pm.Model, sampler: BatchSampler, settings: InferenceSettings, backend: str,
        checkpoint: Checkpoint | None = None) -> FitResult:
    import optax

    use_compilation_cache()
    target = objective(model, sampler.mode)
    optimizer = optax.adam(1.0)  # unit steps, scaled by the learning rate of the chunk
    state = init(model, target, initial_std(settings), optimizer)
    start = time.perf_counter()
    sweep = closing_refit(target) if target.refit_cells is not None else None
    engine = build_engine(target, optimizer, sampler, settings, sweep)
    if settings.convergence == "elbo":  # the checks' ELBO compiled before the clock of the fit starts
        engine.evaluate(state, {})
    if sweep is not None:  # compiled with the checks, not on the clock of the fit
        compile_sweep(sweep, state.params, sampler.rows, sweep_block_size(sampler.n_genes))
    return FitLoop(engine, sampler, settings, backend, checkpoint).run(state, time.perf_counter() - start)


def build_engine(target: Objective, optimizer, sampler: BatchSampler, settings: InferenceSettings, sweep) -> Engine:
    """The fit loop's part of the jax engine: chunks of steps as one jitted scan, the checks'
    ELBO at the fixed cells and, in the ``cells`` layout, the closing ``sweep`` (:func:`closing_refit`)
    on the final fit."""
    import jax
    import jax.numpy as jnp

    averaging = settings.convergence == "elbo"
    chunk_program = jax.jit(partial(run_chunk, target, optimizer, jax.random.PRNGKey(settings.seed), averaging))
    capacity = block_capacity(sampler.rows.cell_nnz, sampler.batch_size) if sampler.mode == "cells" else 0

    def run_steps(state: ADVIState, first_step: int, length: int, learning_rate: float):
        nonlocal capacity
        batches, capacity = sampler.next_stack(length, capacity)
        return chunk_program(state, first_step, batches, learning_rate)

    eval_batch = sampler.evaluation_batch(evaluation_cells(settings, sampler.n_genes), settings.seed)
    eval_batch = {k: jnp.asarray(v) for k, v in eval_batch.items()}
    n_global, n_read = target.layout.size, int(eval_batch["cell_index"].shape[0])
    eval_draws = jnp.asarray(fixed_normal_draws(settings.eval_samples, n_global + n_read, settings.seed))

    @jax.jit
    def fixed_cells_elbo(p):
        if target.refit_cells is not None:
            # The fixed cells at their optimum given the global parameters, however long ago
            # their blocks came round: the check then judges the global parameters alone.
            p = repeat_refit(target, p, eval_batch)
        values = jax.lax.map(lambda eps: target.elbo(p, eps[:n_global], eps[n_global:], eval_batch), eval_draws)
        return jnp.mean(values)

    def fitted(state: ADVIState, final_iterate: dict):
        final = {**state.params, **final_iterate}
        if sweep is not None:
            final = refit_every_cell(sweep, final, sampler.rows, sweep_block_size(sampler.n_genes))
        final = {k: np.asarray(v) for k, v in final.items()}
        means, stds = target.layout.split(final["mean"]), target.layout.split(np.exp(final["log_sd"]))
        means[target.cell_name], stds[target.cell_name] = final["cell_mean"], np.exp(final["cell_log_sd"])
        return means, stds

    constant = target.constant
    return Engine(
        name="jax",
        chunk_steps=chunk_length(sampler, settings, target.layout.size + sampler.batch_size),
        run_chunk=run_steps,
        read_losses=lambda losses: np.asarray(losses) - constant,
        iterate=lambda state: trained(target, state.params),
        flat_parameters=lambda state: np.concatenate([np.asarray(v) for v in state.params.values()]),
        evaluate=lambda state, window: float(fixed_cells_elbo({**state.params, **window})) + constant,
        fitted=fitted,
        save=lambda state: jax.tree.map(np.asarray, state),
        restore=lambda state, saved: jax.tree.map(jnp.asarray, saved),
    )
