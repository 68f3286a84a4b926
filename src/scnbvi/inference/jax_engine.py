"""ADVI in jitted optax loops over the model's JAX log density, local in the cells.

The Gaussian factors are parameterised by mean and log sd. The per-cell Normal prior (its
location and scale drawn with the global parameters) and the entropy are taken in closed form,
so Monte-Carlo noise is drawn only for the global parameters and the minibatch's cells: the
same ELBO as ``pm.fit`` optimises, with less gradient noise, and no per-step random numbers
for the cells outside the minibatch. In the ``entries`` layout each triple draws its cell's value on its own; as the
likelihood is a sum over triples, the estimate stays unbiased.

In the ``cells`` layout each step first moves its block's cells by a Newton step towards their
Laplace approximation given the global means (``Objective.refit_cells``): a cell is visited
once per epoch, and gradient steps alone left its q short of the optimum after tens of epochs.
The gradient step then moves the global parameters only, with the cells' prior and entropy
taken over the block: a step costs the same whatever the number of cells.

``init`` builds an :class:`ADVIState`, ``step`` is one optimiser step, ``run_chunk`` scans steps
in one jitted program and ``run`` drives chunks, checks and the stopping rule.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pymc as pm
import scipy.sparse as sp

from scnbvi.batches import (BATCH_LAYOUT, BatchSampler, block_capacity, cell_block, nonzero_capacity,
                            pad_nonzeros)
from scnbvi.inference.averaging import IterateAverage
from scnbvi.inference.checkpoint import Checkpoint, restore_schedule
from scnbvi.inference.divergence import divergence_error
from scnbvi.inference.elbo import ParameterLayout, cells_per_block, evaluation_cells, fixed_normal_draws
from scnbvi.inference.initialization import initial_std
from scnbvi.inference.jax_graph import minibatch_logp
from scnbvi.inference.plateau import stopping_rule
from scnbvi.inference.progress import Progress
from scnbvi.inference.settings import FitResult, InferenceSettings


class ADVIState(NamedTuple):
    """Variational parameters and optimiser state.

    ``params``: ``mean`` and ``log_sd`` of the global parameters (flat, in the layout's order),
    ``cell_mean`` and ``cell_log_sd`` of the per-cell variable.
    """

    params: dict
    opt_state: Any


class Objective(NamedTuple):
    """The ELBO estimates of one minibatch and what they need to know about the model."""

    elbo: Any  # (params, global_noise, cell_noise, batch) -> ELBO estimate, up to a constant
    step_elbo: Any  # the same, as a step differentiates it (see ``objective``)
    refit_cells: Any  # (params, batch) -> params with the block's cells refitted; None for ``entries``
    trained: tuple[str, ...]  # the params a step's gradient moves
    layout: ParameterLayout  # of the global parameters
    cell_name: str
    n_cells: int

    @property
    def constant(self) -> float:
        """The constants left out of ``elbo``: those of the Gaussian entropies and of the
        expected Normal log prior of the cells."""
        dimension = self.layout.size + self.n_cells
        return 0.5 * dimension * (1.0 + math.log(2 * math.pi)) - 0.5 * self.n_cells * math.log(2 * math.pi)


# A cell's Newton step per visit (it starts where its last visit left it), capped so that a
# cell far from its optimum cannot overshoot into overflow.
MAX_NEWTON_STEP = 1.0
# Newton steps that take a cell from its last visit's value to its optimum (the checks).
REFITS_TO_CONVERGE = 3
# The closing sweep's stopping rule: a cell has settled once the error its last Newton step
# left is below this fraction of its posterior sd; passes at most.
SETTLED_ERROR = 1e-2
MAX_CLOSING_PASSES = 10
# Cells per block of the closing sweep: about 4 million genes x cells entries, within these
# bounds. On 2 cores a whole atlas (39,241 genes) sweeps 1.5x faster in blocks of 256 cells
# than of 101, and 3,000 HVGs fastest in blocks of 1,024.
SWEEP_BLOCK_CELLS = (256, 1024)


def sweep_block_size(n_genes: int) -> int:
    """The closing sweep's cells per block for ``n_genes`` genes."""
    return cells_per_block(n_genes, *SWEEP_BLOCK_CELLS)


def objective(model: pm.Model, mode: str) -> Objective:
    """The ELBO of the model in the given minibatch layout.

    In ``entries`` a step differentiates ``elbo`` in every parameter, with the cells' prior
    and entropy in closed form over all cells. In ``cells`` the refit owns the cells' q, so a
    step moves only the global parameters, and takes the cells' prior and entropy over the
    block, scaled to all cells (unbiased, as the likelihood's): its cost does not grow with
    the number of cells. ``elbo`` (the checks) keeps the sum over every cell.
    """
    import jax
    import jax.numpy as jnp

    names = tuple(BATCH_LAYOUT[mode])
    logp_function, prior_function, global_values, cell_value = minibatch_logp(model, names)
    layout = ParameterLayout.from_model(model, global_values)

    def logp(values, cells_read, batch):
        return logp_function(*(values[name] for name in layout.names), cells_read, *(batch[n] for n in names))[0]

    def prior_at(values, cells):
        """The location and scale of the cells' Normal prior at ``cells``, given the globals."""
        return prior_function(*(values[name] for name in layout.names), cells)

    def prior_and_entropy(mean, log_sd, location, scale):
        """E_q[log N(c | location, scale)] + H[q] summed over the given cells, up to constants."""
        squares = (mean - location) ** 2 + jnp.exp(2 * log_sd)
        return jnp.sum(log_sd - jnp.log(scale) - 0.5 * squares / scale**2)

    n_cells = model.initial_point()[cell_value.name].size
    every_cell = np.arange(n_cells, dtype=np.int32)

    def elbo(p, global_noise, cell_noise, batch):
        values = layout.split(p["mean"] + jnp.exp(p["log_sd"]) * global_noise)
        cells = batch["cell_index"]
        cells_read = p["cell_mean"][cells] + jnp.exp(p["cell_log_sd"][cells]) * cell_noise
        local = prior_and_entropy(p["cell_mean"], p["cell_log_sd"], *prior_at(values, every_cell))
        return logp(values, cells_read, batch) + jnp.sum(p["log_sd"]) + local

    def block_elbo(p, global_noise, cell_noise, batch):
        values = layout.split(p["mean"] + jnp.exp(p["log_sd"]) * global_noise)
        cells = batch["cell_index"]
        mean, log_sd = p["cell_mean"][cells], p["cell_log_sd"][cells]
        local = prior_and_entropy(mean, log_sd, *prior_at(values, cells)) * n_cells / cells.shape[0]
        return logp(values, mean + jnp.exp(log_sd) * cell_noise, batch) + jnp.sum(p["log_sd"]) + local

    def refit_cells(p, batch):
        """The block's cells moved towards the Laplace approximation of their posterior given
        the global means: one damped Newton step for each mean, the curvature for each sd.

        A cell's gradient steps come once per epoch, so by gradient alone its q needs tens of
        epochs to settle; a Newton step per visit takes it most of the way at once. Each
        cell's log density depends on its own value only, so the Hessian is diagonal and one
        Hessian-vector product with ones gives it, with the gradient, in one pass.
        """
        values = layout.split(p["mean"])
        cells = batch["cell_index"]
        location, scale = prior_at(values, cells)

        def log_density(c):
            # logp scales the block's likelihood to the whole data set; a cell's own is 1/scale of it.
            return logp(values, c, batch) * cells.shape[0] / n_cells - 0.5 * jnp.sum(((c - location) / scale) ** 2)

        c = p["cell_mean"][cells]
        gradient, curvature = jax.jvp(jax.grad(log_density), (c,), (jnp.ones_like(c),))
        c = c - jnp.clip(gradient / curvature, -MAX_NEWTON_STEP, MAX_NEWTON_STEP)
        return {**p, "cell_mean": p["cell_mean"].at[cells].set(c),
                "cell_log_sd": p["cell_log_sd"].at[cells].set(-0.5 * jnp.log(-curvature))}

    if mode == "cells":
        return Objective(elbo, block_elbo, refit_cells, ("mean", "log_sd"), layout, cell_value.name, n_cells)
    # In ``entries`` each triple reads its cell on its own: no per-cell log density to refit.
    return Objective(elbo, elbo, None, ("mean", "log_sd", "cell_mean", "cell_log_sd"), layout, cell_value.name,
                     n_cells)


def repeat_refit(target: Objective, params: dict, batch, times: int = REFITS_TO_CONVERGE) -> dict:
    """The batch's cells refitted ``times`` over: at their optimum, from wherever they were."""
    for _ in range(times):
        params = target.refit_cells(params, batch)
    return params


def closing_refit(target: Objective):
    """The closing sweep's jitted step: a block refitted once, and each cell's error left after
    its step, in units of its posterior sd: about half the step's square (the log likelihood's
    curvature changes as exp of the cell's effect)."""
    import jax
    import jax.numpy as jnp

    def refit_and_measure(params, batch):
        cells = batch["cell_index"]
        before = params["cell_mean"][cells]
        params = target.refit_cells(params, batch)
        return params, 0.5 * (params["cell_mean"][cells] - before) ** 2 * jnp.exp(-params["cell_log_sd"][cells])

    return jax.jit(refit_and_measure)


def sweep_shapes(counts: sp.csr_matrix, block_size: int) -> tuple[int, int]:
    """The block of the closing sweep (at most every cell) and its usual non-zero capacity."""
    block_size = min(block_size, counts.shape[0])
    return block_size, block_capacity(counts, block_size)


def refit_every_cell(refit, params: dict, counts: sp.csr_matrix, block_size: int) -> dict:
    """Every cell at its optimum given the final global parameters, block by block: a cell's
    q was last updated when its block came round, before the global parameters settled.
    ``refit`` is :func:`closing_refit` of the fit's objective.

    Each pass gives the cells still short of their optimum one Newton step and estimates the
    error each step left; the next pass takes only the cells whose error is above
    ``SETTLED_ERROR`` sds. On the stacked atlas one pass settles 81 % of the cells and five
    settle all: 1.2 steps per cell, where a fixed count needed three.
    """
    block_size, capacity = sweep_shapes(counts, block_size)
    fillers = np.argsort(np.diff(counts.indptr), kind="stable")[:block_size]
    moving = np.arange(counts.shape[0])
    for _ in range(MAX_CLOSING_PASSES):
        blocks, errors = blocks_covering(moving, block_size, fillers), []
        for cells in blocks:
            block = cell_block(counts, cells)
            capacity = max(capacity, nonzero_capacity(len(block["nz_count"])))
            params, block_errors = refit(params, pad_nonzeros(block, capacity))
            errors.append(block_errors)  # read after the pass: the next block is staged meanwhile
        moving = np.unique(np.concatenate([cells[np.asarray(e) > SETTLED_ERROR] for cells, e in zip(blocks, errors)]))
        if not len(moving):
            break
    return params


def blocks_covering(cells: np.ndarray, block_size: int, fillers: np.ndarray) -> list[np.ndarray]:
    """``cells`` in blocks of one shape, each sorted; the last block is topped up with
    ``fillers`` it lacks (the ``block_size`` cells of fewest non-zeros), which a refit leaves
    at their optimum: the blocks then fit the sweep's non-zero capacity, and the refit
    compiles once."""
    blocks = [cells[start:start + block_size] for start in range(0, len(cells), block_size)]
    missing = block_size - len(blocks[-1])
    if missing:
        others = np.setdiff1d(fillers, blocks[-1], assume_unique=True)
        blocks[-1] = np.concatenate([blocks[-1], others[:missing]])
    return [np.sort(block) for block in blocks]


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
        block_nnz = sampler.counts.nnz / sampler.n_cells * sampler.batch_size
        bytes_per_step = 2 * 16 * max(block_nnz, 1024) + 4 * sampler.batch_size
    else:
        bytes_per_step = 16 * sampler.batch_size
    bytes_per_step += 4 * noise_size
    pieces = max(1, math.ceil(settings.check_every * bytes_per_step / budget_bytes))
    return max(1, settings.check_every // pieces)


def use_compilation_cache() -> None:
    """Keep XLA's compiled programs on disk, as PyTensor keeps its C: a rerun of a fit on the
    same data (after a change of settings, say) skips compilation, several seconds of it.
    ``JAX_COMPILATION_CACHE_DIR`` picks the place; by default the user's cache directory.
    JAX keeps by default only programs that took a second or more to compile: the fit's
    programs each take less on small data, and together most of a warm start's compile time
    (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` still sets the threshold)."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scnbvi" / "jax"
        jax.config.update("jax_compilation_cache_dir", str(cache))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run(model: pm.Model, sampler: BatchSampler, settings: InferenceSettings, backend: str,
        checkpoint: Checkpoint | None = None) -> FitResult:
    import jax
    import jax.numpy as jnp
    import optax

    use_compilation_cache()

    target = objective(model, sampler.mode)
    optimizer = optax.adam(1.0)  # unit steps, scaled by the learning rate of the chunk
    state = init(model, target, initial_std(settings), optimizer)
    averaging = settings.convergence == "elbo"
    chunk_program = jax.jit(partial(run_chunk, target, optimizer, jax.random.PRNGKey(settings.seed), averaging))

    eval_batch = sampler.evaluation_batch(evaluation_cells(settings, sampler.n_genes), settings.seed)
    eval_batch = {k: jnp.asarray(v) for k, v in eval_batch.items()}
    n_global, n_read = target.layout.size, int(eval_batch["cell_index"].shape[0])
    eval_draws = jnp.asarray(fixed_normal_draws(settings.eval_samples, n_global + n_read, settings.seed))

    @jax.jit
    def evaluate(p):
        if target.refit_cells is not None:
            # The fixed cells at their optimum given the global parameters, however long ago
            # their blocks came round: the check then judges the global parameters alone.
            p = repeat_refit(target, p, eval_batch)
        values = jax.lax.map(lambda eps: target.elbo(p, eps[:n_global], eps[n_global:], eval_batch), eval_draws)
        return jnp.mean(values)

    sweep = closing_refit(target) if target.refit_cells is not None else None
    sweep_cells = sweep_block_size(sampler.n_genes)
    t0 = time.perf_counter()
    if averaging:
        evaluate(state.params).block_until_ready()
    if sweep is not None:  # compiled with the checks, not on the clock of the fit
        block_size, capacity = sweep_shapes(sampler.counts, sweep_cells)
        shapes = {name: jax.ShapeDtypeStruct((block_size if name == "cell_index" else capacity,), dtype)
                  for name, dtype in BATCH_LAYOUT["cells"].items()}
        sweep.lower(state.params, shapes).compile()
    compile_seconds = time.perf_counter() - t0

    constant = target.constant
    chunk = chunk_length(sampler, settings, target.layout.size + sampler.batch_size)
    capacity = block_capacity(sampler.counts, sampler.batch_size) if sampler.mode == "cells" else 0
    average = IterateAverage()
    rule = stopping_rule(settings)
    progress = Progress(settings, sampler.steps_per_epoch, sampler.n_cells * sampler.n_genes)
    chunks: list = []
    checks: list[tuple[int, float]] = []
    converged = False
    steps = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        steps, checks, converged = saved["steps"], list(saved["checks"]), saved["converged"]
        state = jax.tree.map(jnp.asarray, saved["state"])
        chunks = [jnp.asarray(saved["losses"])]
        restore_schedule(saved, rule, average, sampler)

    def progress_so_far() -> dict:
        """Everything the next steps depend on, as host arrays."""
        return {
            "steps": steps, "checks": list(checks), "converged": converged,
            "state": jax.tree.map(np.asarray, state),
            "losses": np.concatenate([np.asarray(c) for c in chunks]),
            "rule": copy.deepcopy(vars(rule)),
            "average": {k: jax.tree.map(np.asarray, v) for k, v in vars(average).items()},
            "sampler": sampler.get_state(),
        }

    first_step = steps
    t0 = time.perf_counter()
    with checkpoint.stop_on_signals() if checkpoint is not None else contextlib.nullcontext():
        while steps < settings.max_iterations and not converged:
            length = min(chunk, settings.max_iterations - steps, settings.check_every - steps % settings.check_every)
            batches, capacity = sampler.next_stack(length, capacity)
            learning_rate = settings.learning_rate * rule.learning_rate_scale
            if steps == first_step:
                compiling = time.perf_counter()
                jax.block_until_ready(chunk_program.lower(state, steps, batches, learning_rate).compile())
                compile_seconds += time.perf_counter() - compiling
                t0 += time.perf_counter() - compiling
            state, total, losses = chunk_program(state, steps, batches, learning_rate)
            if chunks:  # let one chunk run while the next is staged, but never queue more
                chunks[-1].block_until_ready()
            if averaging:
                average.add_sum(total, length)
            chunks.append(losses)
            steps += length
            if steps % settings.check_every == 0:
                last = float(losses[-1])
                if not np.isfinite(last):
                    raise divergence_error(steps, settings)
                if averaging:
                    checks.append((steps, float(evaluate({**state.params, **average.close_window()})) + constant))
                    converged = rule.update(checks[-1][1])
                else:
                    converged = rule.update(np.concatenate([np.asarray(v) for v in state.params.values()]))
                progress.check(steps, last - constant, rule)
            else:
                progress.step(steps, lambda: float(losses[-1]) - constant)
            if checkpoint is not None and not converged and checkpoint.due():
                checkpoint.save(progress_so_far())
    losses = np.concatenate([np.asarray(c) for c in chunks]) - constant
    if not np.all(np.isfinite(losses)):
        raise divergence_error(int(np.argmax(~np.isfinite(losses))) + 1, settings)
    final = {**state.params, **average.result(trained(target, state.params))} if averaging else state.params
    if target.refit_cells is not None:
        final = refit_every_cell(sweep, final, sampler.counts, sweep_cells)
    final = {k: np.asarray(v) for k, v in final.items()}
    fit_seconds = time.perf_counter() - t0
    means, stds = target.layout.split(final["mean"]), target.layout.split(np.exp(final["log_sd"]))
    means[target.cell_name], stds[target.cell_name] = final["cell_mean"], np.exp(final["cell_log_sd"])
    return FitResult(
        means=means,
        stds=stds,
        losses=losses,
        checks=checks,
        epochs=len(losses) / sampler.steps_per_epoch,
        converged=converged,
        fit_seconds=fit_seconds,
        compile_seconds=compile_seconds,
        engine="jax",
        backend=backend,
        settings=settings,
        decays=rule.decays,
        final_learning_rate=settings.learning_rate * rule.learning_rate_scale,
    )
