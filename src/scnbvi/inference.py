"""Mean-field ADVI of the model, with two interchangeable engines.

``pymc`` runs ``pm.fit`` on a PyTensor backend (``c``, ``numba`` or the pure-Python ``py``
linker). ``jax`` compiles the same model's log density to JAX and drives ADVI in a jitted optax
loop. Both stream minibatches from a sparse matrix, share the convergence rule and return the
same :class:`FitResult`, so everything downstream is engine-agnostic.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import scipy.sparse as sp

from scnbvi.batches import BatchSampler, nonzero_capacity, pad_nonzeros
from scnbvi.model import BATCH_CONTAINERS, build_model

log = logging.getLogger("scnbvi")

BACKENDS = ("c", "py", "numba", "jax")
CONVERGENCE_RULES = ("elbo", "parameters")


@dataclass(frozen=True)
class InferenceSettings:
    """How to fit; mirrors the ``inference`` section of the workflow config."""

    minibatch: str = "cells"
    batch_size: int = 128
    max_iterations: int = 300_000
    learning_rate: float = 0.05
    learning_rate_decay: float = 0.5
    max_decays: int = 3
    seed: int = 0
    draws: int = 1000
    init: str = "data"
    initial_std: float = 0.05
    convergence: str = "elbo"
    tolerance: float = 1e-4
    check_every: int = 250
    patience: int = 2
    eval_cells: int = 1024
    eval_samples: int = 4
    memory_limit_gb: float | None = None
    log_every_seconds: float = 10.0


@dataclass
class FitResult:
    """The fitted mean-field Gaussian (unconstrained space) and how the fit went."""

    means: dict[str, np.ndarray]
    stds: dict[str, np.ndarray]
    losses: np.ndarray
    checks: list[tuple[int, float]]
    steps: int
    epochs: float
    converged: bool
    stop_reason: str
    fit_seconds: float
    compile_seconds: float
    engine: str
    backend: str
    attrs: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- backends


def engine_for(backend: str) -> str:
    """The engine that runs a backend: JAX has its own loop, the rest go through ``pm.fit``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "jax" if backend == "jax" else "pymc"


def require_backend(backend: str) -> None:
    """Fail early, with what is missing, when a backend cannot run on this machine."""
    engine_for(backend)
    if backend == "c" and not pytensor.config.cxx:
        raise RuntimeError(
            "backend 'c' needs a C++ compiler (g++) and none was found on this machine; "
            "install one or set backend: py (pure-Python linker, slower)"
        )
    if backend in ("numba", "jax"):
        try:
            __import__(backend)
        except ImportError as err:
            raise RuntimeError(
                f"backend {backend!r} needs the Python package {backend!r}, which is not "
                f"installed ({err}); install it or choose backend c or py"
            ) from err


def pytensor_mode(backend: str):
    """The PyTensor compile mode of a ``pymc``-engine backend."""
    if backend == "py":
        # Without fusion each elementwise op is one vectorised NumPy call; fused composites
        # would run element by element in Python.
        return pytensor.compile.mode.Mode(linker="py", optimizer="fast_run").excluding("fusion")
    if backend == "numba":
        return "NUMBA"
    if backend == "jax":
        return pytensor.compile.mode.Mode(linker="py", optimizer="fast_compile")
    return "FAST_RUN"


# --------------------------------------------------------------------------- initialisation


def estimate_memory_bytes(n_cells: int, n_genes: int, nnz: int, settings: InferenceSettings) -> dict[str, float]:
    """Peak memory of a fit by part, so a run that cannot fit is refused before it starts."""
    parameters = 2 * (n_cells + n_genes) + n_genes + 8
    if settings.minibatch == "cells":
        block_nnz = nnz / max(n_cells, 1) * settings.batch_size
        step = settings.batch_size * n_genes * 8 * 8 + block_nnz * 8 * 8
    else:
        step = settings.batch_size * 8 * 16
    eval_cells = evaluation_cells(settings, n_genes)
    return {
        "counts": nnz * 8 * 2 + n_cells * 16,
        "variational parameters": parameters * 8 * 12,
        "minibatch step": step + 2 * 256e6,
        "convergence check": eval_cells * n_genes * 8 * 8,
        "posterior draws": settings.draws * (2 * n_cells + 3 * n_genes) * 4 * 1.5,
        "libraries": 600e6,
    }


def evaluation_cells(settings: InferenceSettings, n_genes: int) -> int:
    """Cells for the fixed-cells ELBO, capped so the check stays cheap for wide matrices."""
    return int(min(settings.eval_cells, max(32, 4_000_000 // max(n_genes, 1))))


def available_memory_bytes(settings: InferenceSettings) -> float:
    """The configured limit, else the job's SLURM allocation, else what the machine has free."""
    if settings.memory_limit_gb is not None:
        return settings.memory_limit_gb * 1e9
    if os.environ.get("SLURM_MEM_PER_NODE"):
        return float(os.environ["SLURM_MEM_PER_NODE"]) * 1e6
    import psutil

    return float(psutil.virtual_memory().available)


def check_memory(counts: sp.csr_matrix, settings: InferenceSettings) -> None:
    parts = estimate_memory_bytes(*counts.shape, counts.nnz, settings)
    needed, available = sum(parts.values()), available_memory_bytes(settings)
    largest = max(parts, key=parts.get)
    log.info("memory estimate %.2f GB of %.2f GB available (largest part: %s)", needed / 1e9, available / 1e9, largest)
    if needed > available:
        raise MemoryError(
            f"fitting {counts.shape[0]} cells x {counts.shape[1]} genes needs about {needed / 1e9:.1f} GB "
            f"(largest part: {largest}, {parts[largest] / 1e9:.1f} GB) but {available / 1e9:.1f} GB are "
            "available; fix: lower inference.batch_size or inference.draws, select genes with "
            "slice.genes (hvg), or give the job more memory (mem_mb / inference.memory_limit_gb)"
        )


def data_driven_initvals(counts: sp.csr_matrix, cell_log_offset, gene_log_offset) -> dict:
    """Start gene effects at log mean expression and cell effects at log library size.

    Both are centred so that the population means start at zero; this places the fit near
    the optimum's ridge and cuts the number of steps ADVI needs.
    """
    counts = sp.csr_matrix(counts)
    cell_totals = np.asarray(counts.sum(axis=1)).ravel()
    gene_totals = np.asarray(counts.sum(axis=0)).ravel()
    cell_effect = np.log(cell_totals + 0.5) - cell_log_offset
    cell_effect -= cell_effect.mean()
    log_cell_exposure = np.logaddexp.reduce(cell_effect + cell_log_offset)
    gene_effect = np.log(gene_totals + 0.5) - log_cell_exposure - gene_log_offset
    sigma_cell = max(cell_effect.std(), 0.05)
    sigma_gene = max(gene_effect.std(), 0.05)
    mu_gene = gene_effect.mean()
    return {
        "mu_gene": np.array(mu_gene),
        "sigma_gene": np.array(sigma_gene),
        "z_gene": (gene_effect - mu_gene) / sigma_gene,
        "mu_cond": np.array(0.0),
        "sigma_cond": np.array(sigma_cell),
        "z_cell": cell_effect / sigma_cell,
    }


# --------------------------------------------------------------------------- convergence


class ConvergenceMonitor:
    """Decides when to stop, from checks taken every ``check_every`` steps.

    ``elbo``: a low-noise ELBO estimate on a fixed set of cells with fixed Monte-Carlo draws
    (common random numbers), so minibatch noise cannot fake a plateau; stop when it improved
    by less than ``tolerance`` (relative) over the last ``patience`` checks, after the
    learning rate has been shrunk on ``max_decays`` such plateaus.
    ``parameters``: the original notebook's rule (``pm.callbacks.CheckParametersConvergence``):
    stop when the largest relative change of the variational parameters between two checks
    is below ``tolerance``.
    """

    def __init__(self, rule: str, tolerance: float, patience: int, decay: float = 1.0, max_decays: int = 0):
        if rule not in CONVERGENCE_RULES:
            raise ValueError(f"convergence must be one of {CONVERGENCE_RULES}, got {rule!r}")
        self.rule, self.tolerance, self.patience = rule, tolerance, patience
        self.decay, self.max_decays = decay, max_decays if decay < 1 else 0
        self.decays = 0
        self.history: list[float] = []
        self._previous_params: np.ndarray | None = None

    @property
    def learning_rate_scale(self) -> float:
        """The factor by which plateaus have shrunk the learning rate so far."""
        return self.decay**self.decays

    def update_elbo(self, elbo: float) -> bool:
        """True once converged. A plateau first shrinks the learning rate by ``decay`` (at
        most ``max_decays`` times): a plateau that is only the noise floor of the current step
        size gives way, and a fit is never declared converged because its steps were made
        too small to move, as a fixed decay schedule would."""
        self.history.append(elbo)
        if len(self.history) <= self.patience:
            return False
        past = self.history[-1 - self.patience]
        if (elbo - past) / abs(elbo) >= self.tolerance:
            return False
        if self.decays < self.max_decays:
            self.decays += 1
            return False
        return True

    def update_parameters(self, params: np.ndarray) -> bool:
        previous, self._previous_params = self._previous_params, params.copy()
        if previous is None:
            return False
        change = np.abs((params - previous) / previous)
        return float(np.max(change)) < self.tolerance


class IterateAverage:
    """Average of the variational parameters over the current check window (Polyak averaging).

    Minibatch noise makes the last iterate jitter around the optimum; the window average does
    not, so the convergence check and the returned fit use it (``elbo`` rule only; the
    ``parameters`` rule reproduces the original and keeps the last iterate). Parameters are
    an array or a dict of arrays.
    """

    def __init__(self):
        self.total, self.count, self.last_window = None, 0, None

    def add(self, params) -> None:
        self.add_sum(_map(np.copy, params), 1)

    def add_sum(self, total, count: int) -> None:
        self.total = total if self.total is None else _map(lambda a, b: a + b, self.total, total)
        self.count += count

    def close_window(self):
        self.last_window = self._mean()
        self.total, self.count = None, 0
        return self.last_window

    def result(self, last_iterate):
        """The newest average (a partial window counts), else the last iterate."""
        if self.count:
            return self._mean()
        return self.last_window if self.last_window is not None else last_iterate

    def _mean(self):
        return _map(lambda total: total / self.count, self.total)


def _map(function, *trees):
    """``function`` applied leafwise to arrays or to dicts of arrays."""
    if isinstance(trees[0], dict):
        return {key: function(*(tree[key] for tree in trees)) for key in trees[0]}
    return function(*trees)


class Progress:
    """Plain progress lines (step, epoch, loss, rate, ETA) that read well in a batch job log."""

    def __init__(self, total: int, steps_per_epoch: float, every_seconds: float):
        self.total, self.steps_per_epoch, self.every = total, steps_per_epoch, every_seconds
        self.start = self.last = time.perf_counter()

    def maybe_log(self, step: int, loss: float, elbo: float | None = None, force=False):
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = step / max(now - self.start, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        extra = "" if elbo is None else f" eval_elbo {elbo:.6g}"
        log.info(
            "step %d/%d epoch %.2f loss %.6g%s %.1f it/s eta(max) %s",
            step, self.total, step / self.steps_per_epoch, loss, extra, rate, _clock(eta),
        )


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------- shared helpers


def _free_layout(model: pm.Model) -> list[tuple[str, tuple[int, ...]]]:
    point = model.initial_point()
    return [(v.name, point[v.name].shape) for v in model.value_vars]


def _split(flat: np.ndarray, layout) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=int))
        out[name] = np.asarray(flat[start : start + size]).reshape(shape)
        start += size
    return out


def _entropy(stds: np.ndarray) -> float:
    return float(np.sum(np.log(stds)) + 0.5 * stds.size * (1.0 + math.log(2 * math.pi)))


def fixed_normal_draws(n_samples: int, dim: int, seed: int) -> np.ndarray:
    """Common random numbers for the low-noise ELBO estimate."""
    return np.random.default_rng([seed, 7]).standard_normal((n_samples, dim))


# --------------------------------------------------------------------------- engines


def fit(
    counts: sp.csr_matrix,
    cell_log_offset: np.ndarray,
    gene_log_offset: np.ndarray,
    settings: InferenceSettings,
    backend: str = "c",
    gene_dispersion: bool = False,
    cell_names=None,
    gene_names=None,
) -> tuple[pm.Model, FitResult]:
    """Fit the model to a sparse cells x genes count matrix; returns the model and the fit."""
    require_backend(backend)
    counts = sp.csr_matrix(counts)
    check_memory(counts, settings)
    initvals = (
        data_driven_initvals(counts, cell_log_offset, gene_log_offset)
        if settings.init == "data"
        else None
    )
    sampler = BatchSampler(counts, settings.minibatch, settings.batch_size, settings.seed)
    if settings.minibatch == "cells":
        settings = per_epoch_checks(settings, sampler.steps_per_epoch)
    model = build_model(
        cell_log_offset=cell_log_offset,
        gene_log_offset=gene_log_offset,
        mode=settings.minibatch,
        batch_size=sampler.batch_size,
        gene_dispersion=gene_dispersion,
        cell_names=cell_names,
        gene_names=gene_names,
        initvals=initvals,
        dense_float32=engine_for(backend) == "jax",
    )
    run = _fit_jax if engine_for(backend) == "jax" else _fit_pymc
    result = run(model, sampler, settings, backend)
    log.info(
        "stopped after %d steps (%.2f epochs, %.1f s, compile %.1f s): %s",
        result.steps, result.epochs, result.fit_seconds, result.compile_seconds, result.stop_reason,
    )
    return model, result


def _initial_std(settings: InferenceSettings) -> float:
    """Start q narrow when starting from the data: a wide q on the many gene and cell effects
    would make noisy effects look costly and drag the scale parameters (sigma) away from the
    data before the means have settled. From the prior, keep PyMC's default (softplus(0))."""
    return settings.initial_std if settings.init == "data" else math.log(2.0)


def convergence_monitor(settings: InferenceSettings) -> ConvergenceMonitor:
    return ConvergenceMonitor(settings.convergence, settings.tolerance, settings.patience,
                              settings.learning_rate_decay, settings.max_decays)


def per_epoch_checks(settings: InferenceSettings, steps_per_epoch: float) -> InferenceSettings:
    """Stretch the check interval to at least one epoch.

    A cell's own parameters only learn when its block comes round, once per epoch; judging a
    plateau (and shrinking the step size) faster than that would freeze them on large data.
    """
    return replace(settings, check_every=max(settings.check_every, math.ceil(steps_per_epoch)))


def _fit_result(layout, mean, std, losses, checks, converged, sampler, settings,
                fit_seconds, compile_seconds, engine, backend) -> FitResult:
    steps = len(losses)
    if converged:
        reason = f"converged ({settings.convergence} rule, tolerance {settings.tolerance:g})"
    else:
        reason = f"reached max_iterations={settings.max_iterations} without converging"
    return FitResult(
        means=_split(mean, layout),
        stds=_split(std, layout),
        losses=losses,
        checks=checks,
        steps=steps,
        epochs=steps / sampler.steps_per_epoch,
        converged=converged,
        stop_reason=reason,
        fit_seconds=fit_seconds,
        compile_seconds=compile_seconds,
        engine=engine,
        backend=backend,
    )


def _fit_pymc(model, sampler, settings, backend) -> FitResult:
    mode = pytensor_mode(backend)
    containers = [model[name] for name in BATCH_CONTAINERS[sampler.mode]]

    def load(batch):
        for container in containers:
            container.set_value(batch[container.name].astype(container.dtype))

    layout = _free_layout(model)
    eval_batch = sampler.evaluation_batch(evaluation_cells(settings, sampler.n_genes), settings.seed)
    draws = fixed_normal_draws(settings.eval_samples, sum(int(np.prod(s)) for _, s in layout), settings.seed)
    monitor = convergence_monitor(settings)
    progress = Progress(settings.max_iterations, sampler.steps_per_epoch, settings.log_every_seconds)
    checks: list[tuple[int, float]] = []
    state = {"converged": False}

    t0 = time.perf_counter()
    with model:
        logp_fn = model.compile_logp(jacobian=True, mode=mode)
        advi = pm.ADVI(
            random_seed=settings.seed,
            start_sigma={name: np.full(shape, _initial_std(settings)) for name, shape in layout},
        )
    group = advi.approx.groups[0]
    order = [group.ordering[name] for name, _ in layout]
    compile_seconds = time.perf_counter() - t0

    def raw_params() -> np.ndarray:
        return np.concatenate([group.params_dict["mu"].get_value(), group.params_dict["rho"].get_value()])

    def split_raw(flat: np.ndarray):
        mean_flat, rho_flat = np.split(flat, 2)
        mean = np.concatenate([mean_flat[o[1]] for o in order])
        std = np.log1p(np.exp(np.concatenate([rho_flat[o[1]] for o in order])))
        return mean, std

    def evaluate(mean, std) -> float:
        load(eval_batch)
        values = [logp_fn(_split(mean + std * eps, layout)) for eps in draws]
        return float(np.mean(values)) + _entropy(std)

    average = IterateAverage()
    learning_rate = pytensor.shared(settings.learning_rate, name="learning_rate")

    def after_step(approx, losses, step):
        if step == 1:
            timing["first_step"] = time.perf_counter()
        load(sampler.next())
        if settings.convergence == "elbo":
            average.add(raw_params())
        if step % settings.check_every == 0:
            if settings.convergence == "elbo":
                checks.append((step, evaluate(*split_raw(average.close_window()))))
                done = monitor.update_elbo(checks[-1][1])
                learning_rate.set_value(settings.learning_rate * monitor.learning_rate_scale)
            else:
                done = monitor.update_parameters(raw_params())
            progress.maybe_log(step, losses[-1], checks[-1][1] if checks else None, force=True)
            if done:
                state["converged"] = True
                raise StopIteration
        else:
            progress.maybe_log(step, losses[-1])

    load(sampler.next())
    timing = {"start": time.perf_counter()}
    with model:
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
            raise FloatingPointError(_divergence_message(len(advi.hist), settings)) from err
    losses = np.asarray(advi.hist, dtype=float)
    compile_seconds += timing.get("first_step", timing["start"]) - timing["start"]
    fit_seconds = time.perf_counter() - timing.get("first_step", timing["start"])
    mean, std = split_raw(average.result(raw_params()))
    return _fit_result(layout, mean, std, losses, checks, state["converged"], sampler, settings,
                       fit_seconds, compile_seconds, "pymc", backend)


def _divergence_message(step: int, settings: InferenceSettings) -> str:
    return (
        f"ADVI diverged at step {step} (loss is not finite) with learning_rate="
        f"{settings.learning_rate:g}; fix: lower inference.learning_rate (e.g. "
        f"{settings.learning_rate / 10:g})"
    )


def _jax_inputs(model: pm.Model, container_names) -> dict:
    """Symbolic stand-ins for the data containers, so each step can pass its own minibatch
    instead of the constants that jaxification would bake in."""
    containers = [model[name] for name in container_names]
    inputs = [pt.tensor(name=f"{c.name}_batch", dtype=c.dtype, shape=(None,) * c.ndim) for c in containers]
    return dict(zip(containers, inputs))


def jaxify(inputs, outputs):
    """A PyTensor graph as a JAX function, like ``pymc.sampling.jax.get_jaxified_graph`` but
    keeping ``log1p(exp(x))``: XLA vectorises it, while the stabilised softplus that PyTensor
    would put in its place (three nested selects) makes the dense part's gradient ~5x slower."""
    from pytensor.compile.mode import JAX
    from pytensor.compile.sharedvalue import SharedVariable
    from pytensor.graph import FunctionGraph
    from pytensor.graph.replace import clone_replace
    from pytensor.graph.traversal import graph_inputs
    from pytensor.link.jax.dispatch import jax_funcify

    # Shared variables left in the graph (dimension lengths) become constants.
    shared = [v for v in graph_inputs(outputs) if isinstance(v, SharedVariable)]
    outputs = clone_replace(outputs, replace={v: pt.constant(v.get_value(borrow=True)) for v in shared})
    fgraph = FunctionGraph(inputs=inputs, outputs=outputs, clone=True)
    JAX.excluding("local_log1p_plusminus_exp").optimizer.rewrite(fgraph)
    return jax_funcify(fgraph)


def _jax_logp(model: pm.Model, container_names):
    """The model's log density (Jacobian included) as a JAX function of (values..., batch...)."""
    from pytensor.graph.replace import graph_replace

    batch_inputs = _jax_inputs(model, container_names)
    logp = graph_replace(model.logp(jacobian=True), batch_inputs, strict=False)
    return jaxify(model.value_vars + list(batch_inputs.values()), [logp])


def cell_variable(model: pm.Model):
    """The per-cell latent variable (dims ``cell``), which must be N(0, 1) a priori."""
    from pytensor.tensor.basic import get_underlying_scalar_constant_value
    from pytensor.tensor.random.basic import NormalRV

    rv = next(rv for rv in model.free_RVs if model.named_vars_to_dims.get(rv.name) == ("cell",))
    loc, scale = (float(get_underlying_scalar_constant_value(v)) for v in rv.owner.inputs[-2:])
    if not isinstance(rv.owner.op, NormalRV) or (loc, scale) != (0.0, 1.0):
        raise ValueError(f"the per-cell variable {rv.name} must be Normal(0, 1) a priori")
    return rv


def _jax_minibatch_logp(model: pm.Model, container_names):
    """The model's log density without the per-cell prior, as a JAX function of
    (global values..., cells' values as read by the minibatch, batch...).

    The likelihood must read the per-cell variable only as ``z[cell_index]``; that read
    becomes an input, so a step draws and differentiates only the minibatch's cells. Their
    N(0, 1) prior has a closed-form expectation under q and is added by the engine.
    """
    from pytensor.graph.replace import graph_replace
    from pytensor.graph.traversal import ancestors

    cell_rv = cell_variable(model)
    cell_value = model.rvs_to_values[cell_rv]
    global_rvs = [rv for rv in model.free_RVs if rv is not cell_rv]
    logp = model.logp(vars=global_rvs + model.observed_RVs + model.potentials, jacobian=True)
    reads = [v for v in ancestors([logp]) if v.owner is not None and cell_value in v.owner.inputs]
    if any(len(v.owner.inputs) != 2 or v.owner.inputs[1] is not model["cell_index"] for v in reads):
        raise ValueError(f"the likelihood must read {cell_value.name} only as {cell_value.name}[cell_index]")
    cells_read = pt.vector(f"{cell_value.name}_read", dtype=cell_value.dtype)
    logp = graph_replace(logp, {v: cells_read for v in reads}, strict=False)
    batch_inputs = _jax_inputs(model, container_names)
    logp = graph_replace(logp, batch_inputs, strict=False)
    global_values = [model.rvs_to_values[rv] for rv in global_rvs]
    function = jaxify(global_values + [cells_read] + list(batch_inputs.values()), [logp])
    return function, global_values, cell_value


def _stack_batches(batches: list[dict[str, np.ndarray]], mode: str) -> dict[str, np.ndarray]:
    """Stack a chunk of batches; ``cells`` blocks are padded to one power-of-two capacity."""
    if mode == "cells":
        capacity = nonzero_capacity(max(len(b["nz_count"]) for b in batches))
        batches = [pad_nonzeros(b, capacity) for b in batches]
    return {name: np.stack([b[name] for b in batches]) for name in batches[0]}


def _chunk_length(sampler: BatchSampler, settings: InferenceSettings, budget_bytes: float = 256e6) -> int:
    """Steps per jitted scan: one check interval, split so the staged batches fit the budget."""
    if sampler.mode == "cells":
        block_nnz = sampler.counts.nnz / sampler.n_cells * sampler.batch_size
        bytes_per_step = 2 * 16 * max(block_nnz, 1024) + 4 * sampler.batch_size
    else:
        bytes_per_step = 16 * sampler.batch_size
    pieces = max(1, math.ceil(settings.check_every * bytes_per_step / budget_bytes))
    return max(1, settings.check_every // pieces)


def _fit_jax(model, sampler, settings, backend) -> FitResult:
    """ADVI in a jitted optax loop, with the per-cell part of the ELBO handled per minibatch.

    The Gaussian factors are parameterised by mean and log sd. The per-cell N(0, 1) prior
    and the entropy are taken in closed form, so Monte-Carlo noise is drawn only for the
    global parameters and the minibatch's cells: the same ELBO as ``pm.fit`` optimises, with
    less gradient noise, and no per-step random numbers or transcendental functions for the
    cells outside the minibatch. In the ``entries`` layout each triple draws its cell's value
    on its own; as the likelihood is a sum over triples, the estimate stays unbiased.
    """
    import jax
    import jax.numpy as jnp
    import optax

    names = BATCH_CONTAINERS[sampler.mode]
    logp_function, global_values, cell_value = _jax_minibatch_logp(model, names)
    point = model.initial_point()
    layout = [(v.name, point[v.name].shape) for v in global_values]
    bounds = np.cumsum([0, *[int(np.prod(shape, dtype=int)) for _, shape in layout]])
    n_global, n_cells = int(bounds[-1]), sampler.n_cells

    def logp(theta, cells_read, batch):
        values = [theta[bounds[k] : bounds[k + 1]].reshape(shape) for k, (_, shape) in enumerate(layout)]
        return logp_function(*values, cells_read, *[batch[name] for name in names])[0]

    def cell_prior_and_entropy(p):
        """E_q[log N(z | 0, 1)] + H[q] over every cell, up to constants."""
        return jnp.sum(p["cell_log_sd"]) - 0.5 * jnp.sum(p["cell_mean"] ** 2 + jnp.exp(2 * p["cell_log_sd"]))

    def elbo_estimate(p, global_noise, cell_noise, batch):
        theta = p["mean"] + jnp.exp(p["log_sd"]) * global_noise
        cells = batch["cell_index"]
        cells_read = p["cell_mean"][cells] + jnp.exp(p["cell_log_sd"][cells]) * cell_noise
        return logp(theta, cells_read, batch) + jnp.sum(p["log_sd"]) + cell_prior_and_entropy(p)

    log_sd = math.log(_initial_std(settings))
    params = {
        "mean": jnp.concatenate([jnp.ravel(point[name]) for name, _ in layout]),
        "log_sd": jnp.full(n_global, log_sd),
        "cell_mean": jnp.asarray(point[cell_value.name], dtype=float),
        "cell_log_sd": jnp.full(n_cells, log_sd),
    }
    optimizer = optax.adam(1.0)  # unit steps, scaled by the learning rate of the chunk
    key = jax.random.PRNGKey(settings.seed)

    def normal(key, size, dtype):
        # float32 noise is ample for a Monte-Carlo gradient and several times cheaper on CPU.
        return jax.random.normal(key, (size,), jnp.float32).astype(dtype)

    def step(learning_rate, carry, inputs):
        params, opt_state, total = carry
        step_index, batch = inputs
        global_key, cell_key = jax.random.split(jax.random.fold_in(key, step_index))
        dtype = params["mean"].dtype
        noise = (normal(global_key, n_global, dtype), normal(cell_key, batch["cell_index"].shape[0], dtype))
        value, grads = jax.value_and_grad(lambda p: -elbo_estimate(p, *noise, batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda u: learning_rate * u, updates))
        return (params, opt_state, jax.tree.map(jnp.add, total, params)), value

    @jax.jit
    def run_chunk(params, opt_state, first_step, batches, learning_rate):
        steps = first_step + jnp.arange(batches[names[0]].shape[0])
        carry = (params, opt_state, jax.tree.map(jnp.zeros_like, params))
        (params, opt_state, total), losses = jax.lax.scan(partial(step, learning_rate), carry, (steps, batches))
        return params, opt_state, total, losses

    eval_batch = sampler.evaluation_batch(evaluation_cells(settings, sampler.n_genes), settings.seed)
    eval_batch = {k: jnp.asarray(v) for k, v in eval_batch.items()}
    n_read = int(eval_batch["cell_index"].shape[0])
    eval_draws = jnp.asarray(fixed_normal_draws(settings.eval_samples, n_global + n_read, settings.seed))

    @jax.jit
    def evaluate(p):
        values = jax.lax.map(lambda eps: elbo_estimate(p, eps[:n_global], eps[n_global:], eval_batch), eval_draws)
        return jnp.mean(values)

    t0 = time.perf_counter()
    evaluate(params).block_until_ready()
    compile_seconds = time.perf_counter() - t0

    # The expected log prior of N(0, 1) cells and the Gaussian entropies, constants included.
    dimension = n_global + n_cells
    constant = 0.5 * dimension * (1.0 + math.log(2 * math.pi)) - 0.5 * n_cells * math.log(2 * math.pi)
    opt_state = optimizer.init(params)
    chunk = _chunk_length(sampler, settings)
    average = IterateAverage()
    monitor = convergence_monitor(settings)
    progress = Progress(settings.max_iterations, sampler.steps_per_epoch, settings.log_every_seconds)
    chunks: list = []
    checks: list[tuple[int, float]] = []
    converged = False
    steps = 0
    t0 = time.perf_counter()
    while steps < settings.max_iterations and not converged:
        length = min(chunk, settings.max_iterations - steps, settings.check_every - steps % settings.check_every)
        batches = _stack_batches([sampler.next() for _ in range(length)], sampler.mode)
        if steps == 0:
            compiling = time.perf_counter()
            jax.block_until_ready(run_chunk.lower(params, opt_state, 0, batches, settings.learning_rate).compile())
            compile_seconds += time.perf_counter() - compiling
            t0 += time.perf_counter() - compiling
        learning_rate = settings.learning_rate * monitor.learning_rate_scale
        params, opt_state, total, losses = run_chunk(params, opt_state, steps, batches, learning_rate)
        if chunks:  # let one chunk run while the next is staged, but never queue more
            chunks[-1].block_until_ready()
        average.add_sum(total, length)
        chunks.append(losses)
        steps += length
        if steps % settings.check_every == 0:
            last = float(losses[-1])
            if not np.isfinite(last):
                raise FloatingPointError(_divergence_message(steps, settings))
            if settings.convergence == "elbo":
                checks.append((steps, float(evaluate(average.close_window())) + constant))
                converged = monitor.update_elbo(checks[-1][1])
            else:
                converged = monitor.update_parameters(np.concatenate([np.asarray(v) for v in params.values()]))
            progress.maybe_log(steps, last - constant, checks[-1][1] if checks else None, force=True)
    losses = np.concatenate([np.asarray(c) for c in chunks]) - constant
    fit_seconds = time.perf_counter() - t0
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(_divergence_message(int(np.argmax(~np.isfinite(losses))) + 1, settings))
    final = {k: np.asarray(v) for k, v in (average.result(params) if settings.convergence == "elbo" else params).items()}
    result = _fit_result(layout, final["mean"], np.exp(final["log_sd"]), losses, checks, converged, sampler,
                         settings, fit_seconds, compile_seconds, "jax", backend)
    result.means[cell_value.name], result.stds[cell_value.name] = final["cell_mean"], np.exp(final["cell_log_sd"])
    return result
