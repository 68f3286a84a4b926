"""Parameter recovery, engine agreement, the convergence rule and backend availability."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial

import numpy as np
import pytest

from scnbvi.inference import InferenceSettings, fit, require_backend
from scnbvi.inference.plateau import DecayThenStop, ParameterChangeStop
from scnbvi.errors import BackendUnavailableError, DivergenceError, InsufficientMemoryError
from scnbvi.posterior import draw_posterior
from scnbvi.simulate import SimulationTruth, simulate_counts

TRUTH = SimulationTruth(mu_gene=0.0, sigma_gene=1.5, sigma_cond=0.3, alpha=2.0)
QUICK = InferenceSettings(max_iterations=4000, check_every=250, draws=300, log_every_seconds=1e9)


@pytest.fixture(scope="module")
def simulated():
    adata = simulate_counts(n_cells=400, n_genes=30, seed=11, truth=TRUTH)
    offsets = np.log(adata.obs["depth"].to_numpy() / 1e5), np.log(adata.var["length"].to_numpy() / 2000)
    return adata, offsets


def _fit(simulated, backend="c", gene_dispersion=False, **changes):
    """A fit with one shared alpha, whose recovery the tests check against the truth."""
    adata, (cell_offset, gene_offset) = simulated
    settings = InferenceSettings(**{**QUICK.__dict__, **changes})
    model, result = fit(adata.X, cell_offset, gene_offset, settings, backend=backend, gene_dispersion=gene_dispersion)
    return adata, result, draw_posterior(model, result, settings.draws, settings.seed)


def _centred(values):
    return values - values.mean()


@pytest.fixture(scope="module")
def c_fit(simulated):
    return _fit(simulated, "c")


@pytest.mark.fit
def test_recovers_gene_effects_cell_effects_and_dispersion(c_fit):
    adata, result, idata = c_fit
    post = idata.posterior
    gene_mean = post["gene_effect"].mean(("chain", "draw")).values
    gene_sd = post["gene_effect"].std(("chain", "draw")).values
    true_gene = adata.var["true_gene_effect"].to_numpy()
    # Clearly different gene means (sd 1.5 on the log scale) must come back in their places:
    # a misaligned batch (counts drawn apart from their gene indices) scrambles them.
    error = np.abs(_centred(gene_mean) - _centred(true_gene))
    assert np.all(error < 4 * gene_sd + 0.05), error.max()
    cell_mean = post["cell_effect"].mean(("chain", "draw")).values
    cell_sd = post["cell_effect"].std(("chain", "draw")).values
    cell_error = np.abs(_centred(cell_mean) - _centred(adata.obs["true_cell_effect"].to_numpy()))
    assert np.mean(cell_error < 3 * cell_sd + 0.02) > 0.95
    assert np.corrcoef(cell_mean, adata.obs["true_cell_effect"])[0, 1] > 0.6
    # The cell effects' prior mean is 0: the level shared by genes and cells sits in the genes.
    shared = np.mean(true_gene) + np.mean(adata.obs["true_cell_effect"])
    assert abs(gene_mean.mean() - shared) < 0.1 and abs(cell_mean.mean()) < 0.1
    alpha = post["alpha"].values.ravel()
    # Without total_size scaling the likelihood counts 1/10 of the data: alpha's interval
    # would be about three times wider and far less centred.
    assert np.quantile(alpha, 0.005) < TRUTH.alpha < np.quantile(alpha, 0.995)
    assert alpha.std() < 0.15


@pytest.mark.fit
def test_same_seed_same_numbers(simulated, c_fit):
    _, first, _ = c_fit
    _, again, _ = _fit(simulated, "c")
    np.testing.assert_array_equal(first.losses, again.losses)
    for name in first.means:
        np.testing.assert_array_equal(first.means[name], again.means[name])


@pytest.mark.fit
def test_jax_engine_agrees_with_pymc_engine(simulated, c_fit):
    _, pymc_result, pymc_idata = c_fit
    _, jax_result, jax_idata = _fit(simulated, "jax")
    assert jax_result.engine == "jax" and pymc_result.engine == "pymc"
    assert set(jax_idata.posterior.data_vars) == set(pymc_idata.posterior.data_vars)
    for name, tolerance in (("gene_effect", 0.08), ("cell_effect", 0.08)):
        a = _centred(pymc_idata.posterior[name].mean(("chain", "draw")).values)
        b = _centred(jax_idata.posterior[name].mean(("chain", "draw")).values)
        assert np.max(np.abs(a - b)) < tolerance, name
    alpha = [idata.posterior["alpha"].mean().item() for idata in (pymc_idata, jax_idata)]
    assert abs(alpha[0] - alpha[1]) / alpha[0] < 0.05
    assert abs(pymc_result.checks[-1][1] - jax_result.checks[-1][1]) / abs(pymc_result.checks[-1][1]) < 1e-3


@pytest.mark.fit
def test_entries_layout_runs_and_is_scaled(simulated):
    """A minibatch of 512 of the 12,000 entries stands for all of them: the checks' ELBO is the
    ELBO of the whole data set (unscaled, it would be about 23 times smaller)."""
    from scnbvi.inference import full_data_elbo

    adata, (cell_offset, gene_offset) = simulated
    _, result, _ = _fit(simulated, "c", minibatch="entries", batch_size=512, max_iterations=1500, init="prior")
    assert result.steps == 1500 and not result.converged
    assert np.isfinite(result.losses).all()
    whole = full_data_elbo(adata.X, cell_offset, gene_offset, result, gene_dispersion=False)
    assert result.checks[-1][1] == pytest.approx(whole, rel=0.01)


def test_elbo_rule_stops_on_a_plateau_and_not_while_improving():
    plateau = DecayThenStop(tolerance=1e-3, patience=3)
    improving = DecayThenStop(tolerance=1e-3, patience=3)
    stopped_at = None
    for check in range(40):
        if plateau.update(-1000.0 - 500.0 * np.exp(-check)) and stopped_at is None:
            stopped_at = check
        assert not improving.update(-1000.0 + 2.0 * check)  # +0.2% per check, still rising
    assert stopped_at is not None and 3 < stopped_at < 15


def test_parameter_rule_is_the_relative_change():
    rule = ParameterChangeStop(tolerance=0.01)
    assert not rule.update(np.array([1.0, 2.0]))
    assert not rule.update(np.array([1.1, 2.0]))
    assert rule.update(np.array([1.105, 2.01]))


def test_diverging_fit_says_to_lower_the_learning_rate(simulated):
    with pytest.raises(DivergenceError, match="lower inference.learning_rate"):
        _fit(simulated, "c", learning_rate=1e6, max_iterations=300, init="prior")


def test_backends_that_cannot_run_say_what_is_missing(monkeypatch):
    import pytensor

    monkeypatch.setattr(pytensor.config, "cxx", "")
    with pytest.raises(BackendUnavailableError, match="needs a C\\+\\+ compiler.*backend: py"):
        require_backend("c")
    with pytest.raises(ValueError, match="backend must be one of"):
        require_backend("cuda")


@pytest.mark.fit
def test_pure_python_backend_runs_without_any_compiler(tmp_path):
    """As on a compute node without gcc: no compiler on PATH and a fresh PyTensor cache."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    script = textwrap.dedent(
        """
        import shutil, numpy as np, pytensor
        assert shutil.which("gcc") is None and shutil.which("g++") is None and shutil.which("cc") is None
        assert pytensor.config.cxx == ""
        from scnbvi.inference import InferenceSettings, fit
        from scnbvi.simulate import simulate_counts
        a = simulate_counts(60, 8, seed=2)
        s = InferenceSettings(max_iterations=200, check_every=100, draws=10)
        model, result = fit(a.X, np.zeros(60), np.zeros(8), s, backend="py")
        assert result.backend == "py" and result.steps == 200 and np.isfinite(result.losses).all()
        print("ok")
        """
    )
    environment = {
        "PATH": str(bin_dir),
        "HOME": str(tmp_path),
        "PYTENSOR_FLAGS": f"base_compiledir={tmp_path / 'pytensor'}",
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PYTHONWARNINGS": "ignore",
    }
    result = subprocess.run([str(bin_dir / "python"), "-c", script], env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.fit
def test_a_second_jax_fit_of_the_same_data_reuses_the_first_ones_compiled_programs(tmp_path):
    """The compiled programs land in the user's cache directory, and a second process fitting
    the same data writes none of its own: it found every one there."""
    script = textwrap.dedent(
        """
        import numpy as np
        from scnbvi.inference import InferenceSettings, fit
        from scnbvi.simulate import simulate_counts
        a = simulate_counts(60, 8, seed=2)
        fit(a.X, np.zeros(60), np.zeros(8), InferenceSettings(max_iterations=100, check_every=50), backend="jax")
        """
    )
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path),
                   "PYTHONWARNINGS": "ignore", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    environment.pop("JAX_COMPILATION_CACHE_DIR", None)
    cache = tmp_path / "scnbvi" / "jax"
    written = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        written.append(sorted(p.name for p in cache.iterdir()))
    assert written[0] and written[1] == written[0]


@pytest.mark.fit
def test_numba_backend_fits(simulated):
    _, result, idata = _fit(simulated, "numba", max_iterations=300, draws=20)
    assert result.backend == "numba" and np.isfinite(result.losses).all()
    assert idata.posterior.attrs["backend"] == "numba"


def test_a_matrix_over_the_memory_budget_is_refused_before_fitting(simulated):
    adata, (cell_offset, gene_offset) = simulated
    settings = InferenceSettings(max_iterations=10, memory_limit_gb=0.05)
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* GB .* available; fix: lower inference.batch_size"):
        fit(adata.X, cell_offset, gene_offset, settings, backend="c")


def test_memory_estimate_grows_with_the_data():
    from scnbvi.inference.memory import estimate_memory_bytes

    small = sum(estimate_memory_bytes(1_000, 500, 50_000, QUICK).values())
    atlas = sum(estimate_memory_bytes(186_224, 39_241, 154_000_000, QUICK).values())
    assert small < 2e9 < atlas < 12e9
    # 1.1 million cells: held in memory the counts alone take 16 GB; streamed, the fit took 4.7 GB.
    million = 1_100_000, 39_241, 1_009_641_490, QUICK
    assert sum(estimate_memory_bytes(*million).values()) > 16e9
    assert 4.7e9 < sum(estimate_memory_bytes(*million, streamed=True).values()) < 9e9


def test_a_plateau_shrinks_the_learning_rate_before_the_fit_stops():
    monitor = DecayThenStop(tolerance=1e-3, patience=2, decay=0.5, max_decays=2)
    verdicts = [monitor.update(elbo) for elbo in (-2000.0, -1500.0, -1000.0, -1000.0, -1000.0)]
    assert not any(verdicts) and monitor.learning_rate_scale == 0.5  # first plateau: halve
    assert not monitor.update(-900.0) and monitor.learning_rate_scale == 0.5  # improving again
    assert [monitor.update(-900.0) for _ in range(3)] == [False, False, True]
    assert monitor.learning_rate_scale == 0.25


def test_progress_promises_no_stop_that_a_zero_tolerance_never_makes(caplog):
    """With ``tolerance`` 0 (run to ``max_iterations``) the gains never fall below it: the
    progress line must say so instead of estimating when (log 0 raised here once)."""
    from scnbvi.inference.progress import Progress

    settings = InferenceSettings(tolerance=0.0, check_every=10)
    progress, rule = Progress(settings, 8.0, 1000), DecayThenStop(tolerance=0.0, patience=2, decay=0.5, max_decays=3)
    progress.step(1, 100.0)
    with caplog.at_level("INFO", logger="scnbvi.progress"):
        for check, elbo in enumerate((-2000.0, -1500.0, -1300.0, -1250.0), start=1):
            rule.update(elbo)
            progress.check(10 * check, -elbo, rule)
    assert caplog.records[-1].getMessage().endswith("eta: after more checks")


# A few steps on the small data set: 400 cells in blocks of 128 give a check every 4 steps.
SHORT = dict(max_iterations=13, check_every=1, draws=20)


def test_pymc_engine_trains_on_drawn_blocks_after_every_check(simulated, monkeypatch):
    """The fixed evaluation cells are loaded for each check; the step after it must still
    train on the next block the sampler drew."""
    import pymc as pm
    from pymc.variational.opvi import ObjectiveFunction

    from scnbvi.batches import BatchSampler

    drawn, trained = [], []
    original_next, original_step_function = BatchSampler.next, ObjectiveFunction.step_function

    def recording_next(self):
        batch = original_next(self)
        drawn.append(batch["cell_index"].copy())
        return batch

    def recording_step_function(self, *args, **kwargs):
        step, model = original_step_function(self, *args, **kwargs), pm.modelcontext(None)

        def recorded():
            trained.append(model["cell_index"].get_value().copy())
            return step()

        recorded.get_shared = step.get_shared
        return recorded

    monkeypatch.setattr(BatchSampler, "next", recording_next)
    monkeypatch.setattr(ObjectiveFunction, "step_function", recording_step_function)
    _, result, _ = _fit(simulated, "c", **SHORT)
    assert result.settings.check_every == 4 and len(result.checks) == 3
    assert len(trained) == len(drawn) == result.steps == 13
    for step, (cells, draw) in enumerate(zip(trained, drawn), start=1):  # step k trains on draw k
        np.testing.assert_array_equal(cells, draw, err_msg=f"step {step}")


@pytest.mark.fit
@pytest.mark.parametrize("backend", ["c", "jax"])
def test_a_converged_fit_reports_its_converging_step(simulated, backend):
    """The fit ends at the check whose ELBO the rule judged converged, not before or after it,
    and its ELBO table marks every check at its step."""
    _, result, _ = _fit(simulated, backend, max_iterations=20_000)
    settings = result.settings
    assert result.converged
    checked_at = [step for step, _ in result.checks]
    assert checked_at == list(range(settings.check_every, result.steps + 1, settings.check_every))
    assert result.steps == checked_at[-1]
    rule = DecayThenStop(settings.tolerance, settings.patience, settings.learning_rate_decay, settings.max_decays)
    verdicts = [rule.update(elbo) for _, elbo in result.checks]
    assert verdicts[-1] and not any(verdicts[:-1])
    table = result.elbo_table()
    assert table.dropna(subset=["eval_elbo"])["iteration"].tolist() == checked_at
    assert table["eval_elbo"].iloc[-1] == result.checks[-1][1]


@pytest.mark.parametrize("backend", ["c", pytest.param("jax", marks=pytest.mark.fit)])
def test_effective_settings_are_recorded(simulated, backend):
    """What the fit ran with, not what was asked: the batch clamped to the cells, the check
    interval stretched to an epoch where the engine does not refit the cells at each check
    (pymc), the decays taken and the learning rate they left."""
    _, result, idata = _fit(simulated, backend, batch_size=1000, check_every=1, tolerance=1.0,
                            learning_rate_decay=0.5, max_decays=2, max_iterations=12, draws=20)
    stats = result.statistics()
    assert stats["batch_size"] == 400 and stats["check_every"] == 1
    assert stats["decays"] == result.decays == 2 and stats["converged"] == 1
    assert stats["final_learning_rate"] == pytest.approx(QUICK.learning_rate * 0.25)
    attrs = idata.posterior.attrs
    for key in ("batch_size", "check_every", "decays", "final_learning_rate", "learning_rate"):
        assert attrs[key] == stats[key], key
    _, stretched, _ = _fit(simulated, backend, **SHORT)
    check_every = {"c": 4, "jax": SHORT["check_every"]}[backend]
    assert stretched.statistics()["check_every"] == check_every and stretched.statistics()["batch_size"] == 128


@pytest.mark.parametrize("backend", ["c", pytest.param("jax", marks=pytest.mark.fit)])
def test_parameters_rule_neither_averages_nor_compiles_the_elbo(simulated, backend, monkeypatch):
    import pymc as pm

    from scnbvi.inference.averaging import IterateAverage

    def unused(*args, **kwargs):
        raise AssertionError("not needed by the parameters rule")

    monkeypatch.setattr(pm.Model, "compile_logp", unused)
    monkeypatch.setattr(IterateAverage, "add", unused)
    monkeypatch.setattr(IterateAverage, "add_sum", unused)
    _, result, _ = _fit(simulated, backend, convergence="parameters", **SHORT)
    assert result.steps == 13 and not result.checks


def test_the_plot_and_the_stopping_rule_load_without_pymc():
    """The ELBO plot's environment has no PyMC: the plot, the rule it replays and the package's
    settings and result must import without it."""
    script = ("import sys, scnbvi.plotting, scnbvi.inference.plateau\n"
              "from scnbvi.inference import FitResult, InferenceSettings\n"
              "print(sorted(m for m in ('pymc', 'pytensor', 'jax') if m in sys.modules))")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_the_rules_that_read_a_trace_load_without_pymc():
    """summary, de and anndata read trace.nc: PyMC's import (seconds) is no part of their start."""
    script = ("import sys, scnbvi.summary, scnbvi.de, scnbvi.trace\n"
              "print(sorted(m for m in ('pymc', 'pytensor', 'arviz') if m in sys.modules))")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_parameter_layout_round_trips_the_models_free_variables(simulated):
    from scnbvi.inference import ParameterLayout
    from scnbvi.model import build_model

    adata, (cell_offset, gene_offset) = simulated
    model = build_model(cell_log_offset=cell_offset, gene_log_offset=gene_offset, gene_dispersion=False)
    layout = ParameterLayout.from_model(model)
    assert layout.names == tuple(v.name for v in model.value_vars)
    assert layout.size == 400 + 30 + 4  # cell and gene effects; mu_gene, two sigma and alpha
    point = model.initial_point()
    flat = layout.flatten(point)
    assert flat.shape == (layout.size,)
    for name, values in layout.split(flat).items():
        np.testing.assert_array_equal(values, point[name])


def test_full_data_elbo_equals_the_models_own_log_density_over_the_same_draws(simulated):
    """The benchmark's yardstick (JAX, every cell at once) against PyMC's compiled log density."""
    from scnbvi.batches import cell_block
    from scnbvi.inference import ParameterLayout, full_data_elbo
    from scnbvi.inference.elbo import fixed_normal_draws, gaussian_entropy
    from scnbvi.model import build_model, cell_centring_weights, load_batch

    adata, (cell_offset, gene_offset) = simulated
    _, result, _ = _fit(simulated, "c", **SHORT)
    model = build_model(cell_log_offset=cell_offset, gene_log_offset=gene_offset, batch_size=adata.n_obs,
                        gene_dispersion=False, cell_centring=cell_centring_weights(adata.X, cell_offset))
    load_batch(model, cell_block(adata.X.tocsr(), np.arange(adata.n_obs)))
    layout = ParameterLayout.from_model(model)
    mean, std = layout.flatten(result.means), layout.flatten(result.stds)
    logp = model.compile_logp(jacobian=True)
    draws = fixed_normal_draws(8, layout.size, seed=5)
    expected = np.mean([logp(layout.split(mean + std * eps)) for eps in draws]) + gaussian_entropy(std)
    elbo = full_data_elbo(adata.X, cell_offset, gene_offset, result, gene_dispersion=False, samples=8, seed=5)
    assert elbo == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("field", "value"), [("cell_log_offset", -np.inf), ("gene_log_offset", -np.inf),
                                              ("counts", -np.inf), ("cell_log_offset", np.log(1e308 / 1e5))])
def test_inputs_that_make_the_density_non_finite_are_named_before_fitting(simulated, field, value):
    """A zero depth (log offset -inf), or an absurd one (1e308), must not reach the optimiser,
    whose divergence advice (a smaller learning rate) could not help."""
    from scnbvi.errors import InputError

    adata, (cell_offset, gene_offset) = simulated
    counts, cell_offset, gene_offset = adata.X.copy().astype(float), cell_offset.copy(), gene_offset.copy()
    {"cell_log_offset": cell_offset, "gene_log_offset": gene_offset, "counts": counts.data}[field][3] = value
    with pytest.raises(InputError, match=f"fit: {field}: .*not finite.*fix: check the covariates"):
        fit(counts, cell_offset, gene_offset, QUICK, backend="c")


@pytest.mark.parametrize(("n_genes", "cells"), [(39_241, 256), (10_000, 400), (3_000, 1_024), (500, 1_024)])
def test_closing_sweep_blocks_hold_about_four_million_entries_within_bounds(n_genes, cells):
    """Blocks of the checks' size (101 cells of a whole atlas) swept it 1.5x slower."""
    from scnbvi.inference.closing_sweep import sweep_block_size

    assert sweep_block_size(n_genes) == cells


def test_jax_closing_sweep_settles_every_cell_in_fewer_passes_than_a_fixed_count(simulated, monkeypatch, caplog):
    """From a start far from the optimum (every cell at zero, most of them sds away), the sweep leaves
    every cell within ``SETTLED_ERROR`` sds of the mode that twelve refits reach, and spends
    fewer refits than three per cell."""
    import jax

    from scnbvi.batches import cell_block
    from scnbvi.inference import closing_sweep, jax_engine
    from scnbvi.inference.jax_objective import objective, repeat_refit
    from scnbvi.model import build_model, cell_centring_weights

    adata, (cell_offset, gene_offset) = simulated
    counts = adata.X.tocsr()
    model = build_model(cell_log_offset=cell_offset, gene_log_offset=gene_offset, batch_size=32,
                        jax_forms=True, cell_centring=cell_centring_weights(counts, cell_offset))
    target = objective(model, "cells")
    start = jax_engine.init(model, target, 0.05, __import__("optax").adam(1.0)).params
    start = {**start, "cell_mean": jax.numpy.zeros_like(start["cell_mean"])}
    refitted = []
    monkeypatch.setattr(closing_sweep, "cell_block",
                        lambda c, cells: refitted.append(len(cells)) or cell_block(c, cells))
    with caplog.at_level("INFO", logger="scnbvi.progress"):
        swept = closing_sweep.refit_every_cell(closing_sweep.closing_refit(target), start, counts, block_size=32,
                                               log_every_seconds=0.0)
    assert f"closing sweep, pass 1: 32 of {adata.n_obs} cells refitted" in caplog.text  # long passes say so
    exact = start
    for cells in np.split(np.arange(adata.n_obs), 10):
        exact = repeat_refit(target, exact, cell_block(counts, cells), times=12)
    sd = np.exp(np.asarray(exact["cell_log_sd"]))
    moved = np.abs(np.asarray(start["cell_mean"]) - np.asarray(exact["cell_mean"])) / sd
    error = np.abs(np.asarray(swept["cell_mean"]) - np.asarray(exact["cell_mean"])) / sd
    assert np.median(moved) > 2
    assert error.max() < closing_sweep.SETTLED_ERROR
    assert adata.n_obs <= sum(refitted) < 3 * adata.n_obs


def test_jax_refit_of_a_block_puts_each_cell_at_its_laplace_approximation(simulated):
    """Repeated refits converge to each cell's posterior mode given the global means (found
    here by a 1-D optimiser on the model's own log density) with sd 1/sqrt(-curvature)."""
    import jax
    from scipy import optimize

    from scnbvi.batches import cell_block
    from scnbvi.inference import jax_engine
    from scnbvi.inference.jax_objective import objective
    from scnbvi.model import build_model, cell_centring_weights, load_batch

    adata, (cell_offset, gene_offset) = simulated
    counts = adata.X.tocsr()
    model = build_model(cell_log_offset=cell_offset, gene_log_offset=gene_offset, batch_size=16,
                        jax_forms=True, cell_centring=cell_centring_weights(counts, cell_offset))
    target = objective(model, "cells")
    state = jax_engine.init(model, target, 0.05, __import__("optax").adam(1.0))
    block = np.arange(40, 56)
    batch = {name: jax.numpy.asarray(value) for name, value in cell_block(counts, block).items()}
    params = state.params
    for _ in range(12):
        params = target.refit_cells(params, batch)
    # The model's own log density in one cell's value, everything else at the means of q.
    point = target.layout.split(np.asarray(params["mean"]))
    point[target.cell_name] = np.asarray(params["cell_mean"], dtype=float)
    full = build_model(cell_log_offset=cell_offset, gene_log_offset=gene_offset, batch_size=adata.n_obs,
                       cell_centring=cell_centring_weights(counts, cell_offset))
    load_batch(full, cell_block(counts, np.arange(adata.n_obs)))
    logp = full.compile_logp()
    for cell in block[:4]:
        def negative(value, cell=cell):
            values = dict(point)
            values[target.cell_name] = point[target.cell_name].copy()
            values[target.cell_name][cell] = value
            return -logp(values)
        mode = optimize.minimize_scalar(negative, bracket=(point[target.cell_name][cell] - 0.5,
                                                           point[target.cell_name][cell] + 0.5)).x
        assert params["cell_mean"][cell] == pytest.approx(mode, abs=1e-3)
        step = 1e-3
        curvature = (negative(mode + step) - 2 * negative(mode) + negative(mode - step)) / step**2
        assert np.exp(params["cell_log_sd"][cell]) == pytest.approx(1 / np.sqrt(curvature), rel=1e-2)
    untouched = np.setdiff1d(np.arange(adata.n_obs), block)
    np.testing.assert_array_equal(params["cell_mean"][untouched], state.params["cell_mean"][untouched])


def test_a_jax_step_keeps_the_types_of_its_state_so_the_chunk_program_compiles_once(simulated):
    """A weakly typed initial array turns strongly typed after one step, and every change of
    type (or of a block's padded shape) recompiles the chunk program, seconds each."""
    import jax
    import optax

    from scnbvi.batches import BatchSampler
    from scnbvi.inference import jax_engine
    from scnbvi.inference.jax_objective import objective
    from scnbvi.model import build_model, cell_centring_weights

    adata, (cell_offset, gene_offset) = simulated
    counts = adata.X.tocsr()
    model = build_model(cell_log_offset=cell_offset, gene_log_offset=gene_offset, batch_size=16,
                        jax_forms=True, cell_centring=cell_centring_weights(counts, cell_offset))
    target = objective(model, "cells")
    optimizer = optax.adam(1.0)
    state = jax_engine.init(model, target, 0.05, optimizer)
    sampler = BatchSampler(counts, "cells", 16, seed=0)
    chunk = partial(jax_engine.run_chunk, target, optimizer, jax.random.PRNGKey(0), True)
    traces = []

    def traced_chunk(*args):
        traces.append(args)  # runs only while JAX traces the program, once for each compilation
        return chunk(*args)

    program = jax.jit(traced_chunk)
    capacity = 0
    for first_step in (0, 5, 10):
        batches, capacity = sampler.next_stack(5, capacity)
        before = jax.tree.map(jax.typeof, state)
        state, _, _ = program(state, first_step, batches, 0.05)
        assert jax.tree.map(jax.typeof, state) == before
    assert len(traces) == 1


def test_block_capacity_holds_random_blocks_and_never_exceeds_the_largest_cells(simulated):
    from scnbvi.batches import BatchSampler, block_capacity, nonzero_capacity

    counts = simulated[0].X.tocsr()
    capacity = block_capacity(np.diff(counts.indptr), 16)
    sampler = BatchSampler(counts, "cells", 16, seed=1)
    sizes = [len(sampler.next()["nz_count"]) for _ in range(500)]
    assert max(sizes) <= capacity
    assert capacity <= nonzero_capacity(int(np.sort(np.diff(counts.indptr))[-16:].sum()))


def test_a_steps_block_estimate_of_the_cells_prior_averages_to_the_sum_over_every_cell(simulated):
    """Over the blocks of a partition of the cells, the step's estimate (the block's cell prior
    and entropy scaled to all cells) averages exactly to the checks' ELBO, which sums them over
    every cell; a step moves only the global parameters."""
    import jax
    import optax

    from scnbvi.batches import cell_block
    from scnbvi.inference import jax_engine
    from scnbvi.inference.jax_objective import objective
    from scnbvi.model import build_model, cell_centring_weights

    adata, (cell_offset, gene_offset) = simulated
    counts = adata.X.tocsr()
    model = build_model(cell_log_offset=cell_offset, gene_log_offset=gene_offset, batch_size=20,
                        jax_forms=True, cell_centring=cell_centring_weights(counts, cell_offset))
    target = objective(model, "cells")
    state = jax_engine.init(model, target, 0.05, optax.adam(1.0))
    rng = np.random.default_rng(4)
    params = {**state.params, "cell_mean": rng.normal(size=adata.n_obs), "cell_log_sd": rng.normal(-2, 0.3, adata.n_obs)}
    global_noise = rng.normal(size=target.layout.size)
    differences = []
    for cells in np.split(rng.permutation(adata.n_obs), adata.n_obs // 20):
        batch = {name: jax.numpy.asarray(value) for name, value in cell_block(counts, np.sort(cells)).items()}
        cell_noise = np.zeros(20)
        differences.append(float(target.step_elbo(params, global_noise, cell_noise, batch))
                           - float(target.elbo(params, global_noise, cell_noise, batch)))
    assert np.std(differences) > 1.0
    assert np.mean(differences) == pytest.approx(0.0, abs=1e-6 * np.std(differences))
    assert target.trained == ("mean", "log_sd")


def test_generated_jax_code_leaves_no_file_behind(tmp_path, monkeypatch):
    """PyTensor writes each generated function's source to a temporary file of its own."""
    import tempfile

    import pytensor.tensor as pt

    from scnbvi.inference.jax_graph import jaxify

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x = pt.vector("x")
    function = jaxify([x], [pt.sum(pt.exp(x) * 2.0 + pt.log1p(x))])
    assert float(function(np.array([0.0, 1.0]))[0]) == pytest.approx(2 + 2 * np.e + np.log(2.0), rel=1e-6)
    assert list(tmp_path.iterdir()) == []
