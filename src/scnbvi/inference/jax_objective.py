"""The ELBO of a minibatch over the model's JAX log density, local in the cells.

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
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pymc as pm

from scnbvi.batches import BATCH_LAYOUT
from scnbvi.inference.elbo import ParameterLayout
from scnbvi.inference.jax_graph import minibatch_logp


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
