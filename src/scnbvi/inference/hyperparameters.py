"""The hyperparameters' posterior with the effects they govern integrated out.

A mean-field q cannot carry the correlation of a hierarchical scale (``sigma_cond``,
``log_alpha_sd``) with the many effects it governs: where those effects are weakly informed,
its sd came out about half of NUTS's. But each effect's q is (close to) its posterior given the
hyperparameters at q's means (the jax engine refits the cells to exactly that), so it holds the
effect's own likelihood as a Gaussian: precision ``lambda = 1/s^2 - 1/sigma^2`` and
precision-weighted mean ``eta = m/s^2 - mu/sigma^2``, with ``mu``, ``sigma`` the effect's prior
location and scale at q's means. The effect then integrates out in closed form (its estimate is
``N(mu, sigma^2 + 1/lambda)``), and the hyperparameters' log posterior is their prior plus one
such term per effect: the normal-normal (empirical Bayes) marginal. Its curvature at q's means
(a Laplace approximation) gives the hyperparameters' sds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
from pytensor.graph.replace import graph_replace
from pytensor.graph.traversal import ancestors
from pytensor.tensor.random.basic import NormalRV

from scnbvi.inference.backends import pytensor_mode
from scnbvi.inference.settings import FitResult
from scnbvi.model import RAW_CELL_EFFECT

log = logging.getLogger("scnbvi")

HYPERPARAMETER_ESTIMATES = ("collapsed", "mean-field")


@dataclass(frozen=True)
class EffectGroup:
    """Effects with a common Normal prior: its location and scale (graphs in the model's
    value variables) and the effects' q means and sds, on the scale the prior speaks of."""

    name: str
    location: pt.TensorVariable
    scale: pt.TensorVariable
    means: np.ndarray
    sds: np.ndarray


def effect_groups(model: pm.Model, result: FitResult) -> list[EffectGroup]:
    """Every free Normal variable whose prior depends on other free variables. Partially
    non-centred cell effects are taken centred (``cell_effect ~ N(0, sigma_cond)``): given
    ``sigma_cond`` at q's mean, their raw q maps linearly onto the centred effects'."""
    free = set(model.free_RVs)
    groups = []
    for rv in model.free_RVs:
        if not isinstance(rv.owner.op, NormalRV):
            continue
        location, scale = rv.owner.inputs[-2:]
        if not free & set(ancestors([location, scale])):
            continue
        means, sds = result.means[rv.name], result.stds[rv.name]
        if rv.name == RAW_CELL_EFFECT:
            factor = _cell_effect_per_raw_unit(model, result)
            location, scale = pt.constant(0.0), model["sigma_cond"]
            rv, means, sds = model["cell_effect"], factor * means, factor * sds
        location, scale = model.replace_rvs_by_values([location, scale])
        groups.append(EffectGroup(rv.name, location, scale, means, sds))
    return groups


def _cell_effect_per_raw_unit(model: pm.Model, result: FitResult) -> np.ndarray:
    """``sigma_cond^(1 - w_i)``: the centred cell effect of a unit raw value, at q's means."""
    (effect,) = model.replace_rvs_by_values([model["cell_effect"]])
    inputs = [model.rvs_to_values[model[name]] for name in ("sigma_cond", RAW_CELL_EFFECT)]
    function = pytensor.function(inputs, effect, mode=pytensor_mode(result.backend), on_unused_input="ignore")
    raw = np.ones_like(result.means[RAW_CELL_EFFECT])
    return np.asarray(function(result.means[inputs[0].name], raw))


def collapsed_log_posterior(model: pm.Model, groups: list[EffectGroup], result: FitResult):
    """The hyperparameters' log posterior with the effects integrated out, as a graph in one
    vector of their unconstrained values; returns (graph, that vector, their value variables)."""
    hyper_values = [v for v in model.value_vars
                    if any(v in ancestors([g.location, g.scale]) for g in groups)]
    if any(result.means[v.name].ndim for v in hyper_values):
        raise ValueError("hyperparameters must be scalars")
    hyper_rvs = [model.values_to_rvs[v] for v in hyper_values]
    vector = pt.vector("hyperparameters", shape=(len(hyper_values),))
    at_vector = {v: vector[k] for k, v in enumerate(hyper_values)}
    total = graph_replace(model.logp(vars=hyper_rvs, jacobian=True), at_vector, strict=False)
    evaluate = pytensor.function(hyper_values, [p for g in groups for p in (g.location, g.scale)],
                                 mode=pytensor_mode(result.backend), on_unused_input="ignore")
    fitted = evaluate(*(result.means[v.name] for v in hyper_values))
    for k, group in enumerate(groups):
        location_at_mean, scale_at_mean = (np.broadcast_to(fitted[2 * k + j], group.means.shape) for j in (0, 1))
        precision = np.maximum(1.0 / group.sds**2 - 1.0 / scale_at_mean**2, 0.0)
        # An effect its data do not inform adds nothing; its eta is then only fitting noise.
        natural_mean = np.where(precision > 0, group.means / group.sds**2 - location_at_mean / scale_at_mean**2, 0.0)
        location, scale = graph_replace([group.location, group.scale], at_vector, strict=False)
        total = total + _integrated_effects(location, scale**2, precision, natural_mean)
    return total, vector, hyper_values


def _integrated_effects(location, variance, precision: np.ndarray, natural_mean: np.ndarray):
    """sum_i log N(eta_i / lambda_i | location, variance + 1/lambda_i), up to a constant, in a
    form that stays finite as lambda_i -> 0 (an effect the data barely inform)."""
    lam, eta = pt.as_tensor(precision), pt.as_tensor(natural_mean)
    shrink = 1.0 + lam * variance
    return pt.sum(-0.5 * pt.log(shrink) + (0.5 * eta**2 * variance + eta * location - 0.5 * lam * location**2) / shrink)


def collapse_hyperparameters(model: pm.Model, result: FitResult) -> FitResult:
    """``result`` with its hyperparameters' sd from the curvature of their collapsed posterior
    (see the module's docstring) at q's means; the means stay q's (on real droplet cells they
    were as close to NUTS's as the collapsed mode). Unchanged if the model has no hierarchical
    prior, or if the collapsed posterior is not concave there."""
    groups = effect_groups(model, result)
    if not groups:
        return result
    objective, vector, hyper_values = collapsed_log_posterior(model, groups, result)
    # A handful of hyperparameters: the Hessian as the vectorised Jacobian of the gradient,
    # not a Scan over its rows, which takes seconds to compile.
    gradient = pytensor.gradient.grad(objective, vector)
    hessian = pytensor.function([vector], pytensor.gradient.jacobian(gradient, vector, vectorize=True),
                                mode=pytensor_mode(result.backend))
    curvature = -hessian(np.array([float(result.means[v.name]) for v in hyper_values]))
    names = ", ".join(v.name for v in hyper_values)
    if not np.all(np.linalg.eigvalsh(curvature) > 0):
        log.warning("kept mean-field sds of %s: their collapsed posterior is not concave at q's means", names)
        return result
    sds = np.sqrt(np.diag(np.linalg.inv(curvature)))
    stds = dict(result.stds)
    for value, sd in zip(hyper_values, sds):
        log.info("%s: sd %.3g as fitted, %.3g with the effects integrated out", value.name,
                 float(stds[value.name]), sd)
        stds[value.name] = np.asarray(sd)
    return replace(result, stds=stds)
