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
    decay_steps: int = 1000
    seed: int = 0
    draws: int = 1000
    init: str = "data"
    initial_std: float = 0.05
    convergence: str = "elbo"
    tolerance: float = 1e-4
    check_every: int = 250
    patience: int = 3
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
    by less than ``tolerance`` (relative) over the last ``patience`` checks.
    ``parameters``: the original notebook's rule (``pm.callbacks.CheckParametersConvergence``):
    stop when the largest relative change of the variational parameters between two checks
    is below ``tolerance``.
    """

    def __init__(self, rule: str, tolerance: float, patience: int):
        if rule not in CONVERGENCE_RULES:
            raise ValueError(f"convergence must be one of {CONVERGENCE_RULES}, got {rule!r}")
        self.rule, self.tolerance, self.patience = rule, tolerance, patience
        self.history: list[float] = []
        self._previous_params: np.ndarray | None = None

    def update_elbo(self, elbo: float) -> bool:
        self.history.append(elbo)
        if len(self.history) <= self.patience:
            return False
        past = self.history[-1 - self.patience]
        return (elbo - past) / abs(elbo) < self.tolerance

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
    ``parameters`` rule reproduces the original and keeps the last iterate).
    """

    def __init__(self):
        self.total, self.count, self.last_window = None, 0, None

    def add(self, params) -> None:
        self.total = params.copy() if self.total is None else self.total + params
        self.count += 1

    def add_sum(self, total, count: int) -> None:
        self.total = total if self.total is None else self.total + total
        self.count += count

    def close_window(self):
        self.last_window = self.total / self.count
        self.total, self.count = None, 0
        return self.last_window

    def result(self, last_iterate):
        """The newest average (a partial window counts), else the last iterate."""
        if self.count:
            return self.total / self.count
        return self.last_window if self.last_window is not None else last_iterate


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
        settings = per_epoch_schedule(settings, sampler.steps_per_epoch)
    model = build_model(
        cell_log_offset=cell_log_offset,
        gene_log_offset=gene_log_offset,
        mode=settings.minibatch,
        batch_size=sampler.batch_size,
        gene_dispersion=gene_dispersion,
        cell_names=cell_names,
        gene_names=gene_names,
        initvals=initvals,
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


def learning_rate_at(step, settings: InferenceSettings, xp=np):
    """Adam's step size: decays by ``learning_rate_decay`` every ``decay_steps`` (1 = constant)."""
    return settings.learning_rate * xp.power(settings.learning_rate_decay, step / settings.decay_steps)


def per_epoch_schedule(settings: InferenceSettings, steps_per_epoch: float) -> InferenceSettings:
    """Stretch the check interval and the decay period to at least one epoch.

    A cell's own parameters only learn when its block comes round, once per epoch; on large
    data, judging convergence or shrinking the step size faster than that would freeze them.
    """
    epoch = math.ceil(steps_per_epoch)
    return replace(
        settings,
        check_every=max(settings.check_every, epoch),
        decay_steps=max(settings.decay_steps, epoch),
    )


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
    monitor = ConvergenceMonitor(settings.convergence, settings.tolerance, settings.patience)
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
        learning_rate.set_value(learning_rate_at(step, settings))
        load(sampler.next())
        if settings.convergence == "elbo":
            average.add(raw_params())
        if step % settings.check_every == 0:
            if settings.convergence == "elbo":
                checks.append((step, evaluate(*split_raw(average.close_window()))))
                done = monitor.update_elbo(checks[-1][1])
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


def _jax_logp(model: pm.Model, container_names):
    """The model's log density (Jacobian included) as a JAX function of (values..., batch...).

    The data containers are swapped for symbolic inputs first, so each step can pass its
    own minibatch instead of the constants that jaxification would bake in.
    """
    from pymc.sampling.jax import get_jaxified_graph
    from pytensor.graph.replace import graph_replace

    containers = [model[name] for name in container_names]
    inputs = [pt.tensor(name=f"{c.name}_batch", dtype=c.dtype, shape=(None,) * c.ndim) for c in containers]
    logp = graph_replace(model.logp(jacobian=True), dict(zip(containers, inputs)), strict=False)
    return get_jaxified_graph(inputs=model.value_vars + inputs, outputs=[logp])


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
    import jax
    import jax.numpy as jnp
    import optax

    names = BATCH_CONTAINERS[sampler.mode]
    layout = _free_layout(model)
    sizes = [int(np.prod(shape, dtype=int)) for _, shape in layout]
    bounds = np.cumsum([0, *sizes])
    logp_graph = _jax_logp(model, names)

    def logp(flat, batch):
        values = [flat[bounds[k] : bounds[k + 1]].reshape(shape) for k, (_, shape) in enumerate(layout)]
        return logp_graph(*values, *[batch[name] for name in names])[0]

    def flatten(params):
        return jnp.concatenate([params["mu"], params["rho"]])

    average = IterateAverage()
    optimizer = optax.adam(lambda step: learning_rate_at(step, settings, jnp))
    point = model.initial_point()
    params = {
        "mu": jnp.concatenate([jnp.ravel(point[name]) for name, _ in layout]),
        "rho": jnp.full(int(bounds[-1]), np.log(np.expm1(_initial_std(settings)))),
    }
    opt_state = optimizer.init(params)
    key = jax.random.PRNGKey(settings.seed)

    def step(carry, inputs):
        params, opt_state, total = carry
        step_index, batch = inputs

        def loss(p):
            std = jax.nn.softplus(p["rho"])
            # float32 noise is ample for a Monte-Carlo gradient and several times cheaper on CPU.
            noise = jax.random.normal(jax.random.fold_in(key, step_index), p["mu"].shape, jnp.float32)
            noise = noise.astype(p["mu"].dtype)
            return -(logp(p["mu"] + std * noise, batch) + jnp.sum(jnp.log(std)))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, total + flatten(params)), value

    @jax.jit
    def run_chunk(params, opt_state, first_step, batches):
        steps = first_step + jnp.arange(batches[names[0]].shape[0])
        carry = (params, opt_state, jnp.zeros(2 * int(bounds[-1])))
        (params, opt_state, total), losses = jax.lax.scan(step, carry, (steps, batches))
        return params, opt_state, total, losses

    eval_batch = sampler.evaluation_batch(evaluation_cells(settings, sampler.n_genes), settings.seed)
    eval_batch = {k: jnp.asarray(v) for k, v in eval_batch.items()}
    eval_draws = jnp.asarray(fixed_normal_draws(settings.eval_samples, int(bounds[-1]), settings.seed))

    @jax.jit
    def evaluate(flat):
        mu, rho = jnp.split(flat, 2)
        std = jax.nn.softplus(rho)
        values = jax.lax.map(lambda eps: logp(mu + std * eps, eval_batch), eval_draws)
        return jnp.mean(values) + jnp.sum(jnp.log(std))

    chunk = _chunk_length(sampler, settings)
    t0 = time.perf_counter()
    evaluate(flatten(params)).block_until_ready()
    compile_seconds = time.perf_counter() - t0

    monitor = ConvergenceMonitor(settings.convergence, settings.tolerance, settings.patience)
    progress = Progress(settings.max_iterations, sampler.steps_per_epoch, settings.log_every_seconds)
    entropy_constant = 0.5 * int(bounds[-1]) * (1.0 + math.log(2 * math.pi))
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
            jax.block_until_ready(run_chunk.lower(params, opt_state, 0, batches).compile())
            compile_seconds += time.perf_counter() - compiling
            t0 += time.perf_counter() - compiling
        params, opt_state, total, losses = run_chunk(params, opt_state, steps, batches)
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
                checks.append((steps, float(evaluate(average.close_window())) + entropy_constant))
                converged = monitor.update_elbo(checks[-1][1])
            else:
                converged = monitor.update_parameters(np.asarray(flatten(params)))
            progress.maybe_log(steps, last - entropy_constant, checks[-1][1] if checks else None, force=True)
    losses = np.concatenate([np.asarray(c) for c in chunks]) - entropy_constant
    fit_seconds = time.perf_counter() - t0
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(_divergence_message(int(np.argmax(~np.isfinite(losses))) + 1, settings))
    last = flatten(params)
    mean, rho = np.split(np.asarray(average.result(last) if settings.convergence == "elbo" else last), 2)
    std = np.log1p(np.exp(rho))
    return _fit_result(layout, mean, std, losses, checks, converged, sampler, settings,
                       fit_seconds, compile_seconds, "jax", backend)
