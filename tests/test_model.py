"""The likelihood against scipy, minibatch scaling and alignment of streamed batches."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import pandas as pd
from scipy import stats

from scnbvi.batches import BATCH_LAYOUT, BatchSampler, cell_block, nonzero_capacity, pad_nonzeros
from scnbvi.design import build_design
from scnbvi.model import MIN_CELL_SPREAD, RAW_CELL_EFFECT, build_model, cell_centring_weights, load_batch
from scnbvi.simulate import SimulationTruth, simulate_counts


def _counts(n_cells=12, n_genes=7, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.negative_binomial(2, 0.3, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.6)
    return sp.csr_matrix(dense.astype(np.int32))


def _point(n_cells, n_genes, gene_dispersion, n_coefficients=0, seed=1):
    rng = np.random.default_rng(seed)
    point = {
        "mu_gene": 0.3, "sigma_gene": 0.8, "gene_effect": rng.normal(0.3, 0.8, size=n_genes),
        "sigma_cond": 0.5, "cell_effect": rng.normal(0.0, 0.5, size=n_cells),
    }
    if gene_dispersion:
        point.update(log_alpha_mean=0.2, log_alpha_sd=0.6, log_alpha=rng.normal(0.2, 0.6, size=n_genes))
    else:
        point["alpha"] = 1.7
    if n_coefficients:
        point.update(tau=np.full(n_coefficients, 0.5), gamma=rng.normal(0, 0.3, (n_genes, n_coefficients)))
    return point


def _reference_loglik(counts, point, cell_offset, gene_offset, covariate_log_rate=0.0):
    """log NB summed over a dense block, straight from scipy's parametrisation."""
    gene = point["gene_effect"] + gene_offset
    cell = point["cell_effect"] + cell_offset
    mu = np.exp(cell[:, None] + gene[None, :] + covariate_log_rate)
    if "alpha" in point:
        alpha = np.full(gene.shape, point["alpha"])
    else:
        alpha = np.exp(point["log_alpha"])
    return stats.nbinom.logpmf(counts, alpha[None, :], alpha[None, :] / (alpha[None, :] + mu)).sum()


def _design(n_cells):
    obs = pd.DataFrame({"batch": np.array(["a", "b", "c"])[np.arange(n_cells) % 3],
                        "quality": np.linspace(0.0, 2.0, n_cells) ** 2})
    return build_design(obs, categorical=["batch"], continuous=["quality"])


def _likelihood_term(model, batch, point):
    load_batch(model, batch)
    term = model["y"]
    if term in model.observed_RVs:
        logp = model.logp(vars=[term], jacobian=False)
    else:
        (logp,) = model.replace_rvs_by_values([term])
    values = {}
    for rv in model.free_RVs:
        transform = model.rvs_to_transforms.get(rv)
        value = np.asarray(point[rv.name], dtype=float)
        values[model.rvs_to_values[rv].name] = transform.forward(value).eval() if transform else value
    return float(model.compile_fn(logp, inputs=model.value_vars, on_unused_input="ignore")(values))


@pytest.mark.parametrize("with_design", [False, True], ids=["no-design", "design"])
@pytest.mark.parametrize("gene_dispersion", [False, True])
@pytest.mark.parametrize("mode", ["cells", "entries"])
def test_full_batch_likelihood_equals_scipy(mode, gene_dispersion, with_design):
    counts = _counts()
    n_cells, n_genes = counts.shape
    cell_offset = np.linspace(-1, 1, n_cells)
    gene_offset = np.linspace(0.5, -0.5, n_genes)
    design = _design(n_cells) if with_design else None
    point = _point(n_cells, n_genes, gene_dispersion, design.n_coefficients if design else 0)
    sampler = BatchSampler(counts, mode, n_cells if mode == "cells" else n_cells * n_genes, seed=0)
    batch = sampler.evaluation_batch(n_cells, seed=0)  # every cell: total_size scaling is 1
    model = build_model(cell_log_offset=cell_offset, gene_log_offset=gene_offset, mode=mode,
                        batch_size=sampler.batch_size, gene_dispersion=gene_dispersion,
                        design=None if design is None else design.matrix)
    covariate_log_rate = 0.0
    if design is not None:
        # The model's covariates are centred; beta is read off the model at the point.
        (beta,) = model.replace_rvs_by_values([model["beta"]])
        beta = model.compile_fn(beta, inputs=[model.rvs_to_values[model["gamma"]]])({"gamma": point["gamma"]})
        covariate_log_rate = (design.matrix - design.matrix.mean(axis=0)) @ beta.T
    expected = _reference_loglik(counts.toarray(), point, cell_offset, gene_offset, covariate_log_rate)
    # The cells layout sums its count-independent part in float32.
    np.testing.assert_allclose(_likelihood_term(model, batch, point), expected, rtol=1e-10 if mode == "entries" else 1e-7)


def test_jax_log_density_and_gradient_stay_finite_at_extreme_dispersions():
    """Draws far in the tails of a weakly informed gene's log dispersion: at -150 the float32
    log odds of the dense part pass exp's overflow; at 88 alpha times the minibatch scale overflows its float32
    gradient. Both must stay finite, and the value must agree with PyTensor's own graph."""
    import jax

    from scnbvi.inference.jax_graph import jax_logp

    counts = _counts()
    n_cells, n_genes = counts.shape
    model = build_model(cell_log_offset=np.linspace(-1, 1, n_cells), gene_log_offset=np.zeros(n_genes),
                        batch_size=3, jax_forms=True)
    batch = cell_block(counts, np.arange(3))
    load_batch(model, batch)
    point = model.initial_point()
    point["log_alpha"] = np.r_[-150.0, 88.0, 20.0, np.zeros(n_genes - 3)]
    logp = jax_logp(model, BATCH_LAYOUT["cells"])
    values = [point[v.name] for v in model.value_vars]
    data = [batch[name] for name in BATCH_LAYOUT["cells"]]
    np.testing.assert_allclose(float(logp(*values, *data)[0]), model.compile_logp()(point), rtol=1e-7)
    gradient = jax.grad(lambda v: logp(*v, *data)[0])(values)
    assert all(np.all(np.isfinite(g)) for g in gradient)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jax_dense_softplus_and_its_two_derivatives_match_the_exact_forms(dtype):
    """The dense part's JAX softplus is log(1 + exp(x)) with derivative sigmoid(x) and second
    derivative s (1 - s), finite far past float32's exp overflow; the jaxified model's dense
    part has derivatives of its own."""
    import jax
    import jax.numpy as jnp

    from scnbvi.inference.jax_graph import jax_logp
    from scnbvi.likelihood.jax_form import jax_dense_activations

    _, softplus = jax_dense_activations()
    x = np.linspace(-200, 200, 4001).astype(dtype)
    first = jax.vmap(jax.grad(softplus))
    second = jax.vmap(jax.grad(jax.grad(softplus)))
    exact = np.logaddexp(0.0, x.astype(np.float64))
    sigmoid = np.exp(-np.logaddexp(0.0, -x.astype(np.float64)))
    small = np.exp(-np.abs(x.astype(np.float64)))
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(softplus(jnp.asarray(x)), exact, rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(first(jnp.asarray(x)), sigmoid, rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(second(jnp.asarray(x)), small / (1 + small) ** 2, rtol=rtol, atol=1e-30)

    counts = _counts()
    model = build_model(cell_log_offset=np.zeros(counts.shape[0]), gene_log_offset=np.zeros(counts.shape[1]),
                        batch_size=3, jax_forms=True)
    batch = cell_block(counts, np.arange(3))
    values = [model.initial_point()[v.name] for v in model.value_vars]
    logp = jax_logp(model, BATCH_LAYOUT["cells"])
    graph = str(jax.make_jaxpr(lambda *v: logp(*v, *(batch[n] for n in BATCH_LAYOUT["cells"])))(*values))
    assert "custom_jvp_call" in graph


def test_positive_log_gamma_and_its_derivative_match_scipy():
    """The count part's log-gamma for positive arguments, and JAX's derivative of it (the
    digamma), agree with SciPy's from 1e-8 to 1e10, at integers and between them."""
    import jax
    import pytensor.link.jax.dispatch  # noqa: F401  (float64 in JAX, as in the engine)
    from scipy import special

    from scnbvi.likelihood.jax_form import positive_gammaln

    x = np.concatenate([np.logspace(-8, 10, 2001), np.arange(1.0, 3000.0), np.arange(1.0, 3000.0) - 0.37])
    value = np.asarray(jax.jit(positive_gammaln)(x))
    derivative = np.asarray(jax.jit(jax.vmap(jax.grad(positive_gammaln)))(x))
    assert value.dtype == np.float64
    for got, exact in ((value, special.gammaln(x)), (derivative, special.digamma(x))):
        assert np.max(np.abs(got - exact) / np.maximum(1.0, np.abs(exact))) < 5e-14


@pytest.mark.parametrize("per_gene", [False, True])
def test_jax_count_part_and_its_gradient_match_pytensor(per_gene):
    """The JAX form of the count part is the PyTensor graph's sum of per-entry terms, in value
    and in gradient, with one dispersion or one per entry; padding entries add exactly zero."""
    import jax
    import pytensor
    import pytensor.link.jax.dispatch  # noqa: F401  (float64 in JAX, as in the engine)
    import pytensor.tensor as pt

    from scnbvi.likelihood.jax_form import count_terms, jax_count_part

    rng = np.random.default_rng(2)
    counts = np.r_[rng.integers(1, 400, 30), 0.0, 0.0]
    log_mu = rng.normal(1.0, 2.0, 32)
    log_alpha = rng.normal(0.0, 3.0, 32) if per_gene else np.asarray(0.7)
    symbols = [pt.vector("log_mu"), pt.vector("log_alpha") if per_gene else pt.scalar("log_alpha"), pt.vector("y")]
    total = pt.sum(count_terms(symbols[0], pt.exp(symbols[1]), symbols[1], symbols[2]))
    reference = pytensor.function(symbols, [total, *pt.grad(total, symbols[:2])])(log_mu, log_alpha, counts)
    jax_form = jax.value_and_grad(lambda m, a: jax_count_part()(m, jax.numpy.exp(a), a, counts), argnums=(0, 1))
    value, gradient = jax_form(log_mu, log_alpha)
    np.testing.assert_allclose(value, reference[0], rtol=1e-12)
    for got, exact in zip(gradient, reference[1:]):
        # alpha (psi(y + alpha) - psi(alpha)) cancels for large alpha in either form
        np.testing.assert_allclose(got, exact, rtol=1e-9)
    padding_only = jax_count_part()(log_mu, np.exp(log_alpha), log_alpha, np.zeros(32))
    assert float(padding_only) == 0.0


@pytest.mark.parametrize("with_covariates", [False, True])
def test_tiled_dense_part_and_its_derivatives_match_the_plain_form(monkeypatch, with_covariates):
    """The CPU form of the dense part sums over tiles of genes (the last ones padded) and writes
    its derivatives out: its value, its gradient in every argument and the cells' curvature
    (the refit's) must be the plain form's, and stay finite far past float32's exp overflow."""
    import jax
    import jax.numpy as jnp

    from scnbvi.likelihood import jax_form

    # 5 cells, 10 genes: three passes over two tiles of 2 genes side by side, the last 2 padded.
    monkeypatch.setattr(jax_form, "DENSE_TILE_ENTRIES", 2 * 5)
    monkeypatch.setattr(jax_form, "DENSE_LANES", 2)
    whole, tiled = jax_form.jax_dense_zero_part()
    rng = np.random.default_rng(8)
    a = jnp.asarray(np.r_[rng.normal(-2, 1, 8), -150.0, 150.0], jnp.float32)
    b = jnp.asarray(rng.normal(0, 0.5, 5), jnp.float32)
    w = jnp.asarray(np.exp(rng.normal(0, 1, 10)))
    covariates = [jnp.asarray(rng.normal(size=(10, 2)), jnp.float32), jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)]
    arguments = (a, b, w, *(covariates if with_covariates else []))
    differentiated = tuple(range(len(arguments) - 1 if with_covariates else 3))

    def curvature(form):
        return jax.jvp(lambda cells: jax.grad(form, argnums=1)(a, cells, *arguments[2:]), (b,), (jnp.ones_like(b),))[1]

    np.testing.assert_allclose(tiled(*arguments), whole(*arguments), rtol=1e-6)
    for plain, written in zip(jax.grad(whole, argnums=differentiated)(*arguments),
                              jax.grad(tiled, argnums=differentiated)(*arguments)):
        assert np.all(np.isfinite(written))
        np.testing.assert_allclose(written, plain, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(curvature(tiled)))
    np.testing.assert_allclose(curvature(tiled), curvature(whole), rtol=1e-5)


@pytest.mark.parametrize("mode", ["cells", "entries"])
def test_minibatch_likelihood_is_scaled_to_the_data_set(mode):
    """A batch of B of N cells stands for N/B times its own likelihood (total_size)."""
    counts = _counts(n_cells=40, n_genes=5)
    n_cells, n_genes = counts.shape
    offsets = np.zeros(n_cells), np.zeros(n_genes)
    point = _point(n_cells, n_genes, False)
    sampler = BatchSampler(counts, mode, 8 if mode == "cells" else 8 * n_genes, seed=4)
    batch = sampler.next()
    model = build_model(cell_log_offset=offsets[0], gene_log_offset=offsets[1], mode=mode, batch_size=sampler.batch_size,
                        gene_dispersion=False)
    if mode == "cells":
        dense = counts[batch["cell_index"]].toarray()
        subset = {**point, "cell_effect": point["cell_effect"][batch["cell_index"]]}
        batch_loglik = _reference_loglik(dense, subset, 0.0, 0.0)
        scale = n_cells / 8
    else:
        gene = point["gene_effect"][batch["gene_index"]]
        cell = point["cell_effect"][batch["cell_index"]]
        mu = np.exp(gene + cell)
        batch_loglik = stats.nbinom.logpmf(batch["counts"], 1.7, 1.7 / (1.7 + mu)).sum()
        scale = n_cells * n_genes / len(batch["counts"])
    np.testing.assert_allclose(_likelihood_term(model, batch, point), scale * batch_loglik, rtol=1e-7)


def test_cell_blocks_keep_counts_aligned_with_their_cells():
    counts = _counts(n_cells=50, n_genes=9, seed=5)
    dense = counts.toarray()
    sampler = BatchSampler(counts, "cells", 16, seed=2)
    for _ in range(10):
        batch = sampler.next()
        cells = batch["cell_index"]
        rebuilt = np.zeros((len(cells), 9))
        rebuilt[batch["nz_row"], batch["nz_gene"]] = batch["nz_count"]
        np.testing.assert_array_equal(rebuilt, dense[cells])


def test_entry_batches_keep_counts_aligned_with_their_indices():
    counts = _counts(n_cells=50, n_genes=9, seed=6)
    dense = counts.toarray()
    sampler = BatchSampler(counts, "entries", 128, seed=3)
    for _ in range(10):
        batch = sampler.next()
        np.testing.assert_array_equal(batch["counts"], dense[batch["cell_index"], batch["gene_index"]])
        assert batch["counts"].any()


def test_cell_epochs_visit_every_cell_once():
    sampler = BatchSampler(_counts(n_cells=48, n_genes=3), "cells", 16, seed=0)
    seen = np.concatenate([sampler.next()["cell_index"] for _ in range(3)])
    assert sorted(seen) == list(range(48))


def test_streaming_from_sparse_equals_the_dense_matrix_path():
    counts = _counts(n_cells=30, n_genes=6, seed=8)
    from_sparse = BatchSampler(counts, "cells", 10, seed=1)
    from_dense = BatchSampler(counts.toarray(), "cells", 10, seed=1)
    for _ in range(6):
        a, b = from_sparse.next(), from_dense.next()
        for name in BATCH_LAYOUT["cells"]:
            np.testing.assert_array_equal(a[name], b[name])


def test_a_stack_of_blocks_is_the_blocks_padded_one_by_one():
    """A chunk's blocks staged at once are the sampler's blocks, each padded to the stack's
    capacity, which grows past the one asked for only when a block needs more."""
    counts = _counts(n_cells=50, n_genes=9, seed=5)
    one_by_one, stacked = BatchSampler(counts, "cells", 16, seed=2), BatchSampler(counts, "cells", 16, seed=2)
    for asked in (0, 2048):
        blocks = [one_by_one.next() for _ in range(7)]
        stack, capacity = stacked.next_stack(7, asked)
        assert capacity == max(asked, nonzero_capacity(max(len(b["nz_count"]) for b in blocks)))
        for row, block in enumerate(blocks):
            padded = pad_nonzeros(block, capacity)
            for name, dtype in BATCH_LAYOUT["cells"].items():
                assert stack[name].dtype == dtype
                np.testing.assert_array_equal(stack[name][row], padded[name])
    entries = BatchSampler(counts, "entries", 32, seed=1)
    stack, capacity = entries.next_stack(3)
    assert capacity == 0 and stack["counts"].shape == (3, 32)


def test_padding_adds_only_zero_counts():
    block = cell_block(_counts(), np.arange(5))
    assert nonzero_capacity(3, minimum=4) == 4 and nonzero_capacity(8, minimum=4) == 8
    assert nonzero_capacity(140_000) == 163_840 and nonzero_capacity(131_072) == 131_072
    padded = pad_nonzeros(block, nonzero_capacity(len(block["nz_count"]), minimum=64))
    assert len(padded["nz_count"]) == 64
    assert padded["nz_count"].sum() == block["nz_count"].sum()
    assert not padded["nz_count"][len(block["nz_count"]):].any()


@pytest.mark.parametrize("centring", [None, np.linspace(0.0, 1.0, 12)])
def test_jax_minibatch_log_density_and_closed_form_cell_prior_make_up_the_model_log_density(centring):
    """The graph surgery behind the jax engine: the likelihood with the per-cell variable read
    per block, plus the Normal log density of every cell at the prior's location and scale, is
    the model's own log density (centred, or partially non-centred per cell)."""
    from scnbvi.inference.jax_graph import minibatch_logp

    counts = _counts(n_cells=12, n_genes=7)
    model = build_model(cell_log_offset=np.linspace(-1, 1, 12), gene_log_offset=np.zeros(7), batch_size=12,
                        jax_forms=True, gene_dispersion=True, design=_design(12).matrix, cell_centring=centring)
    batch = cell_block(counts, np.arange(12))
    load_batch(model, batch)
    rng = np.random.default_rng(3)
    point = {name: rng.normal(size=np.shape(value)) for name, value in model.initial_point().items()}
    logp, prior, global_values, cell_value = minibatch_logp(model, tuple(BATCH_LAYOUT["cells"]))
    globals_ = [point[v.name] for v in global_values]
    minibatch = logp(*globals_, point[cell_value.name][batch["cell_index"]],
                     *[batch[name] for name in BATCH_LAYOUT["cells"]])[0]
    location, scale = prior(*globals_, np.arange(12, dtype=np.int32))
    np.testing.assert_allclose(location, 0.0)
    weights = 1.0 if centring is None else centring
    np.testing.assert_allclose(scale, np.exp(point["sigma_cond_log__"]) ** np.broadcast_to(weights, 12), rtol=1e-12)
    some = np.array([7, 2, 11], dtype=np.int32)
    np.testing.assert_array_equal(prior(*globals_, some)[1], np.asarray(scale)[some])
    expected = model.compile_logp()(point)
    cell_prior = stats.norm.logpdf(point[cell_value.name], location, scale).sum()
    np.testing.assert_allclose(float(minibatch) + cell_prior, expected, rtol=1e-7)


def test_partially_non_centred_cell_effects_are_the_same_model():
    """A change of variables, not of model: the density of the raw variable is the centred
    model's density at the implied cell effects times the Jacobian prod_i sigma^(1 - w_i), and
    the reported ``cell_effect`` is that implied effect."""
    counts = _counts(n_cells=12, n_genes=7)
    weights = np.linspace(0.0, 1.0, 12)
    offsets = {"cell_log_offset": np.linspace(-1, 1, 12), "gene_log_offset": np.zeros(7), "batch_size": 12}
    centred, partial = build_model(**offsets), build_model(**offsets, cell_centring=weights)
    for model in (centred, partial):
        load_batch(model, cell_block(counts, np.arange(12)))
    assert "cell_effect" in partial.named_vars and partial["cell_effect"] in partial.deterministics
    rng = np.random.default_rng(8)
    point = {name: rng.normal(size=np.shape(value)) for name, value in partial.initial_point().items()}
    sigma = np.exp(point["sigma_cond_log__"])
    cell_effect = sigma ** (1 - weights) * point[RAW_CELL_EFFECT]
    inputs = [partial.rvs_to_values[partial[name]] for name in ("sigma_cond", RAW_CELL_EFFECT)]
    implied = partial.compile_fn(partial.replace_rvs_by_values([partial["cell_effect"]])[0], inputs=inputs)
    np.testing.assert_allclose(implied({v.name: point[v.name] for v in inputs}), cell_effect, rtol=1e-12)
    as_centred = {name: value for name, value in point.items() if name != RAW_CELL_EFFECT} | {
        "cell_effect": cell_effect}
    jacobian = np.sum((1 - weights) * np.log(sigma))
    np.testing.assert_allclose(partial.compile_logp()(point), centred.compile_logp()(as_centred) + jacobian,
                               rtol=1e-10)


def test_centring_weights_follow_each_cells_information_and_the_spread_of_cell_effects():
    """w = I s^2 / (1 + I s^2) with I the cell's total and s^2 estimated free of counting noise:
    on simulated cells with sigma_cond 0.3 the estimate is near 0.09, not the far larger
    variance of the log totals."""
    adata = simulate_counts(3000, 30, seed=2, truth=SimulationTruth(sigma_cond=0.3, alpha=2.0))
    cell_offset = np.log(adata.obs["depth"].to_numpy() / 1e5)
    weights = cell_centring_weights(adata.X, cell_offset)
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    spread = weights / (totals * (1 - weights))
    np.testing.assert_allclose(spread, spread[0])
    assert spread[0] == pytest.approx(0.09, rel=0.25)
    assert np.var(np.log(totals + 0.5) - cell_offset) > 1.5 * spread[0]
    assert np.all(np.diff(weights[np.argsort(totals)]) >= 0) and np.all((weights >= 0) & (weights < 1))
    # Without signal in the data, the weights fall back to a small assumed spread.
    flat = cell_centring_weights(sp.csr_matrix(np.ones((5, 4))), np.zeros(5))
    np.testing.assert_allclose(flat, 4 * MIN_CELL_SPREAD**2 / (1 + 4 * MIN_CELL_SPREAD**2))


def test_covariate_effects_have_their_hierarchical_prior():
    """Whatever coordinates q uses, the model's density of beta is N(0, tau_k) per coefficient."""
    design = _design(12)
    model = build_model(cell_log_offset=np.zeros(12), gene_log_offset=np.zeros(7), design=design.matrix,
                        coefficient_names=design.names)
    assert list(model.coords["coefficient"]) == ["batch[b]", "batch[c]", "quality"]
    rng = np.random.default_rng(4)
    point = {"gamma": rng.normal(size=(7, 3)), "tau_log__": np.log([0.3, 0.5, 2.0])}
    (beta, prior) = model.replace_rvs_by_values([model["beta"], model["beta_prior"]])
    beta, prior = model.compile_fn([beta, prior], inputs=[model.rvs_to_values[model["gamma"]],
                                                          model.rvs_to_values[model["tau"]]])(point)
    np.testing.assert_allclose(prior, stats.norm.logpdf(beta, 0.0, [0.3, 0.5, 2.0]).sum(), rtol=1e-10)
    # gamma are the coordinates in which the centred covariates are orthonormal
    centred = design.matrix - design.matrix.mean(axis=0)
    np.testing.assert_allclose(np.linalg.norm(centred @ beta.T, axis=0),
                               np.sqrt(12) * np.linalg.norm(point["gamma"], axis=1), rtol=1e-8)
