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

The cell effects' scale ``sigma_cond`` gets more: where the cells are weakly informed its
posterior is skewed, with a long tail towards zero (the funnel), and q's mean sits at its mode,
above NUTS's median; the cells' sds, set by that scale, came out 12 % wider than NUTS's. Its
collapsed density is evaluated on a grid of log ``sigma_cond`` (the other hyperparameters at
q's means); on real droplet cells its quantiles were within 0.03 of NUTS's from the 25th to
the 95th percentile. q of log ``sigma_cond`` becomes the Gaussian with the same median and the
same width of its central 90 % interval, and each cell's posterior given ``sigma_cond`` (its
likelihood as above, times its prior) is averaged over the grid, as INLA does. On atlas-sized
data the grid is narrow and its median is the fixed point of the refitted cells
(``sqrt(mean(m^2 + s^2))``), where q's stochastic steps had left ``sigma_cond`` several
posterior sds off.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
from pytensor.graph.replace import graph_replace
from pytensor.graph.traversal import ancestors
from pytensor.tensor.random.basic import NormalRV
from scipy import optimize, stats

from scnbvi.inference.backends import pytensor_mode
from scnbvi.inference.jax_graph import jaxify
from scnbvi.inference.result import FitResult
from scnbvi.model import RAW_CELL_EFFECT

log = logging.getLogger("scnbvi")

HYPERPARAMETER_ESTIMATES = ("collapsed", "mean-field")
# sigma_cond's q (a Gaussian in log sigma_cond) is given its collapsed posterior's median and
# the width of its central interval of this mass: the long tail towards zero would inflate an
# sd matched to moments (on droplet cells 1.5x NUTS's).
INTERVAL_MASS = 0.9
# The grid of log sigma_cond: evenly spaced points between where the collapsed log density has
# fallen this far below its mode on either side (the funnel's tail falls slowly), about 20 per
# sd of a Gaussian.
GRID_LOG_DENSITY_DROP = 15.0
GRID_POINTS = 221
# Bisections that place each end of the grid: its width known to within 2^-30 of the search span.
END_BISECTIONS = 30


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
            factor = cell_effect_per_raw_unit(model, result.backend)(result.means[_sigma_cond_value(model).name])
            location, scale = pt.constant(0.0), model["sigma_cond"]
            rv, means, sds = model["cell_effect"], factor * means, factor * sds
        location, scale = model.replace_rvs_by_values([location, scale])
        groups.append(EffectGroup(rv.name, location, scale, means, sds))
    return groups


def _sigma_cond_value(model: pm.Model):
    return model.rvs_to_values[model["sigma_cond"]]


def cell_effect_per_raw_unit(model: pm.Model, backend: str):
    """``sigma_cond^(1 - w_i)`` as a function of ``sigma_cond``'s (log) value: the centred cell
    effect of a unit raw value."""
    (effect,) = model.replace_rvs_by_values([model["cell_effect"]])
    inputs = [_sigma_cond_value(model), model.rvs_to_values[model[RAW_CELL_EFFECT]]]
    function = pytensor.function(inputs, effect, mode=pytensor_mode(backend), on_unused_input="ignore")
    raw = np.ones(model[RAW_CELL_EFFECT].type.shape[0] or model.initial_point()[RAW_CELL_EFFECT].size)
    return lambda value: np.asarray(function(value, raw))


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
        precision, natural_mean = likelihood_as_normal(group.means, group.sds, fitted[2 * k], fitted[2 * k + 1])
        location, scale = graph_replace([group.location, group.scale], at_vector, strict=False)
        total = total + _integrated_effects(location, scale**2, precision, natural_mean)
    return total, vector, hyper_values


def likelihood_as_normal(means: np.ndarray, sds: np.ndarray, location, scale) -> tuple[np.ndarray, np.ndarray]:
    """Each effect's likelihood as a Gaussian (precision, precision-weighted mean): its q (``means``,
    ``sds``), which is its posterior given its prior's ``location`` and ``scale`` at q's means,
    less that prior."""
    location, scale = (np.broadcast_to(value, means.shape) for value in (location, scale))
    precision = np.maximum(1.0 / sds**2 - 1.0 / scale**2, 0.0)
    # An effect its data do not inform adds nothing; its eta is then only fitting noise.
    natural_mean = np.where(precision > 0, means / sds**2 - location / scale**2, 0.0)
    return precision, natural_mean


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
    log_density, hessian = collapsed_functions(objective, vector, result.backend)
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
    result = replace(result, stds=stds)
    cells = [group for group in groups if group.name == "cell_effect"]
    if RAW_CELL_EFFECT not in result.means or not cells:
        return result
    return integrate_out_sigma_cond(model, result, cells[0], log_density, hyper_values)


def collapsed_functions(objective, vector, backend: str):
    """The collapsed log density and its Hessian as functions of the hyperparameters' vector.

    With the ``jax`` backend both come from one JAX form of the graph, and JAX differentiates
    it: PyTensor's own Hessian graph took 2 s of rewriting on the 1,000-cell demo, longer than
    the fit, and its pure-Python linker would run the sums over every cell element by element.
    """
    if backend == "jax":
        import jax

        function = jaxify([vector], [objective])
        log_density = jax.jit(lambda values: function(values)[0])
        return log_density, jax.jit(jax.hessian(log_density))
    # A handful of hyperparameters: the Hessian as the vectorised Jacobian of the gradient,
    # not a Scan over its rows, which takes seconds to compile.
    hessian = pytensor.gradient.jacobian(pytensor.gradient.grad(objective, vector), vector, vectorize=True)
    mode = pytensor_mode(backend)
    return pytensor.function([vector], objective, mode=mode), pytensor.function([vector], hessian, mode=mode)


def integrate_out_sigma_cond(model: pm.Model, result: FitResult, cells: EffectGroup, log_density,
                             hyper_values) -> FitResult:
    """``result`` with ``sigma_cond``'s mean and sd from its collapsed density on a grid, and the
    raw cell effects' means and sds averaged over that grid (see the module's docstring)."""
    name = _sigma_cond_value(model).name
    index = [value.name for value in hyper_values].index(name)
    at = np.array([float(result.means[value.name]) for value in hyper_values])

    def along(x: float) -> float:
        point = at.copy()
        point[index] = x
        return float(log_density(point))

    points, weights = density_grid(along, at[index], float(result.stds[name]))
    precision, natural_mean = likelihood_as_normal(cells.means, cells.sds, 0.0, np.exp(at[index]))
    per_raw_unit = cell_effect_per_raw_unit(model, result.backend)
    raw_mean, raw_square = np.zeros_like(precision), np.zeros_like(precision)
    for x, weight in zip(points, weights):
        # The cell effects' posterior given sigma_cond = exp(x), in raw units (their prior is N(0, sigma_cond)).
        factor = per_raw_unit(x)
        posterior_precision = precision + np.exp(-2 * x)
        mean = natural_mean / posterior_precision / factor
        raw_mean += weight * mean
        raw_square += weight * (mean**2 + 1.0 / posterior_precision / factor**2)
    low, mean, high = np.interp([(1 - INTERVAL_MASS) / 2, 0.5, (1 + INTERVAL_MASS) / 2],
                                np.cumsum(weights) - weights / 2, points)
    sd = (high - low) / (2 * stats.norm.ppf((1 + INTERVAL_MASS) / 2))
    log.info("%s: mean %.4g sd %.3g in q; median %.4g and central %.0f %% interval %.4g to %.4g of its collapsed "
             "density (%d points)", name, at[index], float(result.stds[name]), mean, 100 * INTERVAL_MASS, low, high,
             len(points))
    means, stds = dict(result.means), dict(result.stds)
    means[name], stds[name] = np.asarray(mean), np.asarray(sd)
    means[RAW_CELL_EFFECT] = raw_mean
    stds[RAW_CELL_EFFECT] = np.sqrt(np.maximum(raw_square - raw_mean**2, 0.0))
    return replace(result, means=means, stds=stds)


def density_grid(log_density, center: float, sd: float) -> tuple[np.ndarray, np.ndarray]:
    """Points of a 1-D log density, ``GRID_POINTS`` evenly spaced from where it has fallen
    ``GRID_LOG_DENSITY_DROP`` below its mode on one side to where it has on the other, and their
    normalised weights. The mode is searched from ``center`` in steps that start at ``sd`` and
    double: on atlas-sized data q's mean of log sigma_cond sat hundreds of its sds from the mode."""

    @functools.cache  # the searches come back to points they have seen (the start, the mode)
    def value(x: float) -> float:
        result = float(log_density(x))
        return result if np.isfinite(result) else -np.inf

    mode = _mode(value, center, sd)
    level = value(mode) - GRID_LOG_DENSITY_DROP
    low, high = (_crossing(value, mode, direction * sd, level) for direction in (-1.0, 1.0))
    points = np.linspace(low, high, GRID_POINTS)
    values = np.array([value(x) for x in points])
    weights = np.exp(values - values.max())
    return points, weights / weights.sum()


def _mode(value, center: float, step: float) -> float:
    """The maximum of a unimodal ``value``: uphill from ``center`` in doubling steps until it falls,
    then Brent's method within the last three points."""
    here = value(center)
    direction = 1.0 if value(center + step) >= here else -1.0
    behind, x = center - direction * step, center
    for _ in range(200):
        ahead = x + direction * step
        if value(ahead) < here:
            break
        behind, x, here = x, ahead, value(ahead)
        step *= 2.0
    else:
        raise ValueError(f"no mode of the log density within {step:g} of {center:g}")
    bounds = sorted([behind, ahead])
    solution = optimize.minimize_scalar(lambda y: -value(y), bounds=bounds, method="bounded",
                                        options={"xatol": 1e-6 * (bounds[1] - bounds[0])})
    return float(solution.x) if value(float(solution.x)) >= here else x


def _crossing(value, mode: float, step: float, level: float) -> float:
    """Where ``value`` falls to ``level`` on the side of ``mode`` that ``step`` points to: steps
    doubling until below it, then bisection."""
    inside, outside = mode, mode + step
    for _ in range(200):
        if value(outside) < level:
            break
        inside, outside = outside, outside + 2 * (outside - inside)
    else:
        raise ValueError(f"the log density does not fall below {level:g} on one side of {mode:g}")
    for _ in range(END_BISECTIONS):
        middle = (inside + outside) / 2
        inside, outside = (middle, outside) if value(middle) >= level else (inside, middle)
    return outside
