"""Posterior draws from a fitted mean-field approximation, as ArviZ InferenceData."""

from __future__ import annotations

import importlib.metadata

import arviz as az
import numpy as np
import pandas as pd
import pymc as pm
import pytensor
import pytensor.tensor as pt
from pytensor.graph.replace import vectorize_graph

from scnbvi.inference import FitResult, pytensor_mode
from scnbvi.model import RAW_CELL_EFFECT
from scnbvi.outputs import code_version
from scnbvi.trace import GLOBAL_GROUP, STATISTICS_GROUP, draw_statistics

RECORDED_PACKAGES = ("scnbvi", "pymc", "pytensor", "arviz", "numpy", "jax", "anndata")
DRAWS_PER_CHUNK = 100  # draws made and mapped through the model at a time: per-cell values for every cell


def posterior_variables(model: pm.Model) -> list[str]:
    """Every free parameter and derived effect, in the model's order, but the coordinates in
    which q is fitted where the model reports the same quantity on its own scale (``gamma``
    for the covariate effects ``beta``, the partially non-centred cell effects for
    ``cell_effect``)."""
    fitting_coordinates = {"gamma", RAW_CELL_EFFECT}
    return [rv.name for rv in model.free_RVs if rv.name not in fitting_coordinates] + [
        d.name for d in model.deterministics]


def package_versions() -> dict[str, str]:
    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[f"version_{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[f"version_{package}"] = "not installed"
    return versions


def _constrainer(model: pm.Model, names: list[str], backend: str):
    """A function from unconstrained values (a leading draw axis on each) to the named
    variables: the model's own transforms and deterministics, vectorised over draws."""
    outputs = model.replace_rvs_by_values([model[name] for name in names])
    batched = [pt.tensor(dtype=v.type.dtype, shape=(None,) * (v.ndim + 1), name=v.name) for v in model.value_vars]
    vectorised = vectorize_graph(outputs, replace=dict(zip(model.value_vars, batched)))
    return pytensor.function(batched, vectorised, mode=pytensor_mode(backend), on_unused_input="ignore")


def point_estimate(model: pm.Model, result: FitResult) -> dict[str, np.ndarray]:
    """Every parameter and effect at the mean of q (in the unconstrained space), by name."""
    names = posterior_variables(model)
    values = _constrainer(model, names, result.backend)(*(result.means[v.name][None] for v in model.value_vars))
    return {name: np.asarray(value[0]) for name, value in zip(names, values)}


def draw_posterior(
    model: pm.Model, result: FitResult, draws: int, seed: int, chunk: int = DRAWS_PER_CHUNK, attrs: dict | None = None
) -> az.InferenceData:
    """Draws of every variable, per-cell ones for every cell (see :func:`sample_posterior`)."""
    return sample_posterior(model, result, draws, seed, chunk=chunk, attrs=attrs)[0]


def sample_posterior(
    model: pm.Model,
    result: FitResult,
    draws: int,
    seed: int,
    max_cells: int | None = None,
    local_draws: int | None = None,
    chunk: int = DRAWS_PER_CHUNK,
    attrs: dict | None = None,
) -> tuple[az.InferenceData, pd.DataFrame]:
    """Draw from q in the unconstrained space and map the draws through the model's transforms.

    The map is the model's own graph (transforms and deterministics), vectorised over draws,
    so the engines need not know how a parameter is constrained.

    Per-cell variables would dominate an atlas's trace (186,224 cells x 1000 draws), so their
    draws are kept for at most ``max_cells`` cells (a seeded choice, in file order; all when
    None), and their mean and sd over the same draws come for every cell as a table,
    ``{variable}_mean`` and ``{variable}_sd`` indexed by cell. A kept cell's draws are those
    it would have in a trace of every cell.

    Per-gene draws would dominate next (39,241 genes x 1000 draws of gene_effect, alpha and each
    coefficient of beta), so ``posterior`` keeps the first ``local_draws`` draws of every variable
    (all when None): one joint sample that ArviZ and the predictive check read, a prefix of the
    full one. The variables without a gene or cell dimension keep every draw in
    :data:`GLOBAL_GROUP`, and the tables' statistics over every draw are in :data:`STATISTICS_GROUP`
    (see :func:`draw_statistics`), so thinning changes no number downstream.
    """
    names = posterior_variables(model)
    dims = {name: list(model.named_vars_to_dims.get(name, ())) for name in names}
    coords = {name: list(values) for name, values in model.coords.items()}
    per_cell = [name for name in names if dims[name] == ["cell"]]
    kept = _kept_cells(len(coords["cell"]), max_cells, seed)
    constrain = _constrainer(model, names, result.backend)
    rng = np.random.default_rng([seed, 11])
    posterior: dict[str, np.ndarray] = {}
    moments = {name: _Moments() for name in per_cell}
    for start in range(0, draws, chunk):
        size = min(chunk, draws - start)
        values = [
            result.means[v.name] + result.stds[v.name] * rng.standard_normal((size, *result.means[v.name].shape))
            for v in model.value_vars
        ]
        for name, value in zip(names, constrain(*values)):
            if name in moments:
                moments[name].add(value)
                value = value[:, kept]
            if name not in posterior:  # float32 halves the size of atlas-scale traces
                posterior[name] = np.empty((1, draws, *value.shape[1:]), dtype=np.float32)
            posterior[name][0, start : start + size] = value
    coords["cell"] = [coords["cell"][i] for i in kept]
    full = az.from_dict(posterior=posterior, coords=coords, dims=dims).posterior
    statistics = draw_statistics(full)
    kept_draws = draws if local_draws is None else min(local_draws, draws)
    idata = az.InferenceData(posterior=full.isel(draw=slice(0, kept_draws)))
    if kept_draws < draws:
        idata.add_groups({GLOBAL_GROUP: full[[name for name in names if not {"gene", "cell"} & set(dims[name])]]})
    idata.add_groups({STATISTICS_GROUP: statistics})
    idata.posterior.attrs.update(fit_attributes(result, seed, draws, {"local_draws": kept_draws, **(attrs or {})}))
    cells = pd.DataFrame(index=pd.Index(model.coords["cell"], name="cell"))
    for name, accumulated in moments.items():
        cells[f"{name}_mean"], cells[f"{name}_sd"] = accumulated.mean, accumulated.sd()
    return idata, cells


def _kept_cells(n_cells: int, max_cells: int | None, seed: int) -> np.ndarray:
    if max_cells is None or max_cells >= n_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng([seed, 12]).choice(n_cells, max_cells, replace=False))


class _Moments:
    """Mean and sd (ddof 0, as xarray's) over draws arriving in chunks, by Chan's pairwise
    update: the sum of squares would lose a small sd next to a large mean."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        size, chunk_mean = len(values), values.mean(axis=0)
        total = self.n + size
        delta = chunk_mean - self.mean
        self.m2 = self.m2 + ((values - chunk_mean) ** 2).sum(axis=0) + delta**2 * self.n * size / total
        self.mean = self.mean + delta * size / total
        self.n = total

    def sd(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)


def fit_attributes(result: FitResult, seed: int, draws: int, extra: dict) -> dict:
    """What a reader of trace.nc needs to know about how it was made: the fit's statistics and
    effective settings, anything the caller adds, and package versions (netCDF-safe types)."""
    attributes = {
        "inference_method": "mean-field ADVI",
        **result.statistics(),
        "seed": int(seed),
        "draws": int(draws),
        "iterations": int(result.steps),
        **extra,
        **package_versions(),
        **code_version(),
    }
    return {key: value for key, value in attributes.items() if value is not None}
