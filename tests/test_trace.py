"""trace.nc thinned: the per-gene and per-cell draws it keeps are a prefix of the full posterior,
and every table computed from the draws is the same as from a trace that keeps them all."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pandas as pd
import pytest

from scnbvi.de import contrast_table
from scnbvi.design import build_design
from scnbvi.inference import InferenceSettings, fit
from scnbvi.posterior import sample_posterior
from scnbvi.ppc import posterior_draws
from scnbvi.qc import gene_counts
from scnbvi.simulate import SimulationTruth, simulate_counts
from scnbvi.summary import gene_table, posterior_summary
from scnbvi.trace import GLOBAL_GROUP, STATISTICS_GROUP, write_trace

pytestmark = pytest.mark.fit

DRAWS, LOCAL_DRAWS = 250, 40  # three chunks of draws, the kept ones within the first
CONTRASTS = (("batch", "b2", "b1"), ("condition", "treated", "control"))  # cells, then samples as replicates


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """A short fit with a design, donors and per-gene dispersion; its trace written thinned
    (``local_draws``) and full (null), and read back."""
    truth = SimulationTruth(donors=6, donor_effect_sd=0.3, condition_effect_sd=0.5, batch_effect_sd=0.3,
                            log_alpha_sd=0.5)
    adata = simulate_counts(240, 30, seed=3, truth=truth)
    design = build_design(adata.obs, categorical=["condition", "batch"], random=["donor"],
                          reference={"condition": "control", "batch": "b1"})
    depth = adata.obs["depth"].to_numpy()
    model, result = fit(adata.X, np.log(depth / depth.mean()), np.zeros(adata.n_vars),
                        InferenceSettings(max_iterations=200, check_every=100, seed=0), backend="jax",
                        gene_names=adata.var_names, cell_names=adata.obs_names, design=design, gene_dispersion=True)
    directory = tmp_path_factory.mktemp("traces")
    read = {}
    for name, local_draws in (("thinned", LOCAL_DRAWS), ("full", None)):
        idata, _ = sample_posterior(model, result, DRAWS, seed=5, max_cells=50, local_draws=local_draws)
        write_trace(idata, directory / f"{name}.nc")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ArviZ takes the extra groups without complaint
            read[name] = az.from_netcdf(directory / f"{name}.nc")
    return adata, design, depth, read, directory


def test_thinned_trace_keeps_a_prefix_of_the_local_draws_and_every_global_draw(traces):
    _, _, _, read, directory = traces
    thinned, full = read["thinned"], read["full"]
    assert thinned.posterior.sizes["draw"] == LOCAL_DRAWS and full.posterior.sizes["draw"] == DRAWS
    assert thinned.posterior.attrs["local_draws"] == LOCAL_DRAWS and full.posterior.attrs["local_draws"] == DRAWS
    assert set(thinned.posterior.data_vars) == set(full.posterior.data_vars)
    for name, variable in thinned.posterior.data_vars.items():
        np.testing.assert_array_equal(variable.values, full.posterior[name].values[:, :LOCAL_DRAWS])
    global_names = {name for name, variable in full.posterior.data_vars.items()
                    if not {"gene", "cell"} & set(variable.dims)}
    assert {"mu_gene", "sigma_gene", "tau"} <= global_names == set(thinned[GLOBAL_GROUP].data_vars)
    for name in global_names:
        np.testing.assert_array_equal(thinned[GLOBAL_GROUP][name].values, full.posterior[name].values)
    assert GLOBAL_GROUP not in full.groups() and STATISTICS_GROUP in full.groups()
    assert (directory / "thinned.nc").stat().st_size < (directory / "full.nc").stat().st_size / 2


def test_summary_and_gene_table_are_those_of_every_draw(traces):
    adata, _, _, read, _ = traces
    thinned, full = read["thinned"], read["full"]
    summary = posterior_summary(thinned)
    pd.testing.assert_frame_equal(summary, posterior_summary(full))
    names = [name for name, variable in full.posterior.data_vars.items() if "cell" not in variable.dims]
    expected = az.summary(full, var_names=names, kind="stats", round_to="none")
    pd.testing.assert_frame_equal(summary, expected, rtol=1e-6)

    genes = gene_table(thinned, gene_counts(adata.X, adata.var_names))
    pd.testing.assert_frame_equal(genes, gene_table(full, gene_counts(adata.X, adata.var_names)))
    posterior = full.posterior.stack(sample=("chain", "draw"))
    alpha = posterior["alpha"].astype(np.float64)
    np.testing.assert_allclose(genes["log_expression_mean"], posterior["gene_effect"].mean("sample"), rtol=1e-6)
    np.testing.assert_allclose(genes["log_expression_sd"], posterior["gene_effect"].std("sample"), rtol=1e-5)
    np.testing.assert_allclose(genes["dispersion_mean"], (1 / alpha).mean("sample"), rtol=1e-6)
    np.testing.assert_allclose(genes["dispersion_sd"], (1 / alpha).std("sample"), rtol=1e-5)
    np.testing.assert_allclose(genes["inverse_dispersion_sd"], alpha.std("sample"), rtol=1e-5)
    beta = posterior["beta"].sel(coefficient="batch[b2]")
    np.testing.assert_allclose(genes["beta_batch[b2]_mean"], beta.mean("sample"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(genes["beta_batch[b2]_sd"], beta.std("sample"), rtol=1e-5)


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_de_tables_are_those_of_every_draw(traces, contrast):
    adata, design, depth, read, _ = traces
    thinned = contrast_table(read["thinned"], design, contrast, adata.X, depth)
    full = contrast_table(read["full"], design, contrast, adata.X, depth)
    pd.testing.assert_frame_equal(thinned.table, full.table)
    assert thinned.describe() == full.describe()
    if contrast[0] == "batch":
        # The contrast's mean and sd from beta's moments are those of its draws.
        beta = read["full"].posterior["beta"].stack(sample=("chain", "draw")).transpose("gene", "coefficient", ...)
        weights = design.contrast_weights(*contrast)
        log2_fc = np.einsum("gks,k->gs", beta.values.astype(np.float64), weights) / np.log(2.0)
        table = full.table.loc[beta["gene"].values]
        np.testing.assert_allclose(table["log2_fold_change_unshrunk_sd"], log2_fc.std(axis=1), rtol=1e-5)
        shift = full.composition_shift
        np.testing.assert_allclose(table["log2_fold_change_unshrunk"] + shift, log2_fc.mean(axis=1), atol=1e-6)


def test_predictive_check_chooses_among_the_kept_draws(traces):
    _, _, _, read, _ = traces
    cells = list(read["thinned"].posterior["cell"].values[:5])
    draws = posterior_draws(read["thinned"], cells, LOCAL_DRAWS, seed=0)
    np.testing.assert_array_equal(draws.gene_effect, read["full"].posterior["gene_effect"].values[0, :LOCAL_DRAWS])
    # More than the trace keeps: every kept draw, once.
    assert posterior_draws(read["thinned"], cells, LOCAL_DRAWS + 1, seed=0).n_draws == LOCAL_DRAWS
