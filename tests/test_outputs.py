"""What a user opens: the posterior's per-cell draws and moments, the summary, the AnnData of
results and its merge into the user's object, and the permissions of result files."""

from __future__ import annotations

import json
import os
import stat

import anndata as ad
import arviz as az
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import xarray as xr

from conftest import REPO, make_adata, write_h5ad
from scnbvi.data import read_counts, symbols_from_var
from scnbvi.errors import InputError
from scnbvi.inference import FitResult, InferenceSettings
from scnbvi.model import build_model
from scnbvi.outputs import atomic_output, current_umask, write_json, write_table
from scnbvi.posterior import draw_posterior, sample_posterior
from scnbvi.qc import gene_counts
from scnbvi.summary import fit_record, gene_table, hdf5_safe, posterior_summary, result_anndata
from scnbvi.trace import STATISTICS_GROUP, draw_statistics, posterior_statistics, read_trace, write_trace

N_CELLS, N_GENES = 40, 6
README = REPO / "README.md"
COEFFICIENTS = ["condition[treated]", "batch[b2]"]


@pytest.fixture(scope="module")
def fitted():
    """A model with a design and per-gene dispersion, and a made-up q (no fit needed)."""
    rng = np.random.default_rng(0)
    design = np.column_stack([rng.integers(0, 2, N_CELLS), rng.integers(0, 2, N_CELLS)]).astype(float)
    model = build_model(
        cell_log_offset=rng.normal(size=N_CELLS), gene_log_offset=np.zeros(N_GENES),
        cell_names=[f"c{i}" for i in range(N_CELLS)], gene_names=[f"g{g}" for g in range(N_GENES)],
        design=design, coefficient_names=COEFFICIENTS,
    )
    point = model.initial_point()
    means = {name: rng.normal(size=np.shape(value)) for name, value in point.items()}
    stds = {name: rng.uniform(0.05, 0.5, size=np.shape(value)) for name, value in point.items()}
    result = FitResult(means, stds, losses=np.ones(10), checks=[(10, -1.0)], epochs=2.0, converged=True,
                       fit_seconds=1.0, compile_seconds=0.5, engine="pymc", backend="py",
                       settings=InferenceSettings(), decays=1, final_learning_rate=0.025)
    return model, result


def test_per_cell_draws_are_kept_for_a_seeded_subset_with_moments_of_every_cell(fitted):
    model, result = fitted
    full = draw_posterior(model, result, 300, seed=4)
    idata, cells = sample_posterior(model, result, 300, seed=4, max_cells=15)  # three chunks of draws

    kept = list(idata.posterior["cell"].values)
    assert len(kept) == 15 and kept == [name for name in full.posterior["cell"].values if name in kept]
    assert kept != [f"c{i}" for i in range(15)]  # a seeded choice, not the first cells
    again, _ = sample_posterior(model, result, 300, seed=4, max_cells=15)
    assert list(again.posterior["cell"].values) == kept
    for name in ("cell_effect",):
        # A kept cell's draws are those it has in a trace of every cell.
        np.testing.assert_array_equal(idata.posterior[name].values, full.posterior[name].sel(cell=kept).values)
        draws = full.posterior[name].values[0].astype(np.float64)
        np.testing.assert_allclose(cells[f"{name}_mean"], draws.mean(axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(cells[f"{name}_sd"], draws.std(axis=0), rtol=1e-5)
    for name in ("mu_gene", "gene_effect", "alpha", "beta", "tau"):
        np.testing.assert_array_equal(idata.posterior[name].values, full.posterior[name].values)
    assert list(cells.index) == [f"c{i}" for i in range(N_CELLS)] and cells.index.name == "cell"
    assert list(cells.columns) == ["cell_effect_mean", "cell_effect_sd"]


def test_cell_effect_moments_match_q_in_closed_form(fitted):
    """Each cell effect is a Gaussian factor of q: the moments in cells.tsv, taken over the
    draws in chunks, are its mean and sd."""
    model, result = fitted
    _, cells = sample_posterior(model, result, 4000, seed=1, max_cells=0)
    mean, sd = result.means["cell_effect"], result.stds["cell_effect"]
    assert np.max(np.abs(cells["cell_effect_mean"] - mean) / sd) < 0.1
    np.testing.assert_allclose(cells["cell_effect_sd"], sd, rtol=0.06)


def test_trace_round_trips_compressed_with_no_per_cell_draws_or_all_of_them(fitted, tmp_path):
    model, result = fitted
    for max_cells, n_kept in ((0, 0), (None, N_CELLS), (10**6, N_CELLS)):
        idata, _ = sample_posterior(model, result, 50, seed=0, max_cells=max_cells, attrs={"cell_draws_max_cells": -1})
        path = tmp_path / f"trace{n_kept}_{max_cells}.nc"
        write_trace(idata, path)
        back = az.from_netcdf(path)
        assert back.posterior.sizes["cell"] == n_kept and back.posterior.sizes["draw"] == 50
        assert back.posterior.attrs["cell_draws_max_cells"] == -1
        np.testing.assert_array_equal(back.posterior["beta"].values, idata.posterior["beta"].values)
        assert back.posterior["beta"].dtype == np.float32
    with h5py.File(path) as trace:
        assert trace["posterior/beta"].compression == "gzip" and trace["posterior/beta"].shuffle


def test_summary_leaves_out_per_cell_variables(fitted):
    model, result = fitted
    summary = posterior_summary(draw_posterior(model, result, 100, seed=0))
    assert not summary.index.str.contains(r"^cell_effect\[").any()
    assert {"mu_gene", "sigma_cond", "tau[batch[b2]]", "beta[g0, condition[treated]]", "gene_effect[g5]"} <= set(summary.index)
    assert list(summary.columns) == ["mean", "sd", "hdi_3%", "hdi_97%"]


FIT_STATS = {"engine": "pymc", "backend": "c", "steps": 2000, "epochs": 12.5, "converged": 1,
             "stop_reason": "converged (elbo rule, tolerance 0.0001)", "fit_seconds": 9.4, "final_eval_elbo": -5.0,
             "batch_size": 40, "learning_rate": 0.05, "check_every": 300, "eval_samples": 4,
             "scnbvi_version": "0.1.0", "scnbvi_source_hash": "abc", "git_commit": "deadbeef"}


def _record():
    inference = {"batch_size": 128, "learning_rate": 0.05, "check_every": 250, "memory_limit_gb": None,
                 "cell_draws_max_cells": 10000}
    design = {"names": COEFFICIENTS, "factors": {"condition": ["control", ["treated"]], "batch": ["b1", ["b2"]]},
              "scales": {}}
    qc = {"input": "in.h5ad", "before": {"n_cells": 3}, "renamed": {"var": {"count": 1, "names": {"A/B": ["A/B-1"]}}}}
    attrs = {"version_pymc": "5", "version_arviz": "0.23", "draws": 100}
    return fit_record(FIT_STATS, inference, {"gene_dispersion": True}, design, qc, attrs)


def test_fit_record_sections():
    record = _record()
    assert record["inference"] == {"batch_size": 40, "learning_rate": 0.05, "check_every": 300,
                                   "memory_limit_gb": None, "cell_draws_max_cells": 10000, "eval_samples": 4}
    assert record["convergence"] == {key: FIT_STATS[key] for key in (
        "engine", "backend", "steps", "epochs", "converged", "stop_reason", "fit_seconds", "final_eval_elbo")}
    assert record["code_version"] == {"scnbvi_version": "0.1.0", "scnbvi_source_hash": "abc", "git_commit": "deadbeef"}
    assert record["versions"] == {"version_pymc": "5", "version_arviz": "0.23"}
    assert record["model"] == {"gene_dispersion": True}


def test_hdf5_safe_keeps_what_hdf5_holds_and_writes_the_rest_as_json():
    assert hdf5_safe({"a": [1, 2.5], "b": ["x"], "c": [], "d": None}) == {
        "a": pytest.approx(np.array([1, 2.5])), "b": np.array(["x"]), "c": pytest.approx(np.array([], dtype=str)),
        "d": None}
    assert hdf5_safe(["control", ["treated"]]) == '["control", ["treated"]]'
    assert hdf5_safe({"A/B": 1}) == '{"A/B": 1}'


def _results(tmp_path):
    cells = pd.DataFrame({"cell_effect_mean": np.linspace(-1, 1, 4), "cell_effect_sd": 0.1, "depth": [10.0, 20, 30, 40],
                          "log_offset": 0.0, "condition[treated]": [0.0, 1, 0, 1]},
                         index=pd.Index(["c0", "c1", "c3", "c4"], name="cell"))
    counts = np.arange(12).reshape(4, 3) % 4
    idata = az.from_dict(posterior={"gene_effect": np.ones((1, 5, 3)), "alpha": np.ones((1, 5))},
                         coords={"gene": ["g0", "g1", "g2"]}, dims={"gene_effect": ["gene"]})
    genes = gene_table(idata, gene_counts(sp.csr_matrix(counts), ["g0", "g1", "g2"]))
    path = tmp_path / "scnbvi.h5ad"
    with atomic_output(path) as temporary:
        result_anndata(cells, genes, _record()).write_h5ad(temporary)
    return cells, genes, path


def test_result_anndata_has_no_counts_and_prefixed_results(tmp_path):
    cells, genes, path = _results(tmp_path)
    res = ad.read_h5ad(path)
    assert res.X is None and res.shape == (4, 3)
    assert list(res.obs.columns) == [f"scnbvi_{c}" for c in cells.columns]
    assert list(res.var.columns) == [f"scnbvi_{c}" for c in genes.columns]
    np.testing.assert_array_equal(res.obs["scnbvi_cell_effect_mean"], cells["cell_effect_mean"])
    np.testing.assert_array_equal(res.var["scnbvi_total_counts"], genes["total_counts"])
    uns = res.uns["scnbvi"]
    assert set(uns) == {"inference", "model", "design", "convergence", "versions", "code_version", "qc"}
    assert uns["convergence"]["steps"] == 2000 and uns["convergence"]["converged"] == 1
    assert uns["inference"]["batch_size"] == 40 and uns["model"]["gene_dispersion"]
    assert list(uns["design"]["names"]) == COEFFICIENTS
    assert json.loads(uns["design"]["factors"]["condition"]) == ["control", ["treated"]]
    assert json.loads(uns["qc"]["renamed"]["var"]["names"]) == {"A/B": ["A/B-1"]}


# The line the README and docs/outputs.md give scanpy users, run here as written there.
MERGE_LINE = 'adata = scnbvi.merge(ad.read_h5ad("my_counts.h5ad"), "results/mine")'


def test_the_documented_merge_line_joins_results_onto_the_users_object(tmp_path, monkeypatch):
    cells, genes, path = _results(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "mine").mkdir(parents=True)
    path.rename(tmp_path / "results" / "mine" / "scnbvi.h5ad")
    # The user's object: more cells than were fitted (c2 was sliced away), a column of the same
    # name as a result's, and counts.
    make_adata(np.ones((5, 3)), obs={"depth": [1.0, 2, 3, 4, 5]}).write_h5ad(tmp_path / "my_counts.h5ad")
    for document in (README, REPO / "docs" / "outputs.md"):
        assert MERGE_LINE in document.read_text().splitlines(), document
    namespace = {}
    exec(f"import anndata as ad\nimport scnbvi\n{MERGE_LINE}", namespace)
    adata = namespace["adata"]
    np.testing.assert_array_equal(adata.obs["depth"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(adata.obs["scnbvi_depth"], [10, 20, np.nan, 30, 40])
    np.testing.assert_array_equal(adata.var["scnbvi_n_cells_expressed"], genes["n_cells_expressed"])
    assert adata.uns["scnbvi"]["convergence"]["steps"] == 2000


def test_gene_table_and_contrasts_carry_symbols_into_the_anndata(tmp_path):
    idata = az.from_dict(posterior={"gene_effect": np.ones((1, 5, 3)), "alpha": np.ones((1, 5))},
                         coords={"gene": ["ENSG1", "ENSG2", "ENSG3"]}, dims={"gene_effect": ["gene"]})
    var = pd.DataFrame({"feature_name": pd.Categorical(["TP53", None, "MYC"])}, index=["ENSG1", "ENSG2", "ENSG3"])
    symbols = symbols_from_var(var, "feature_name")
    assert list(symbols) == ["TP53", "ENSG2", "MYC"] and symbols_from_var(var, None) is None
    genes = gene_table(idata, gene_counts(sp.csr_matrix(np.eye(3, dtype=int)), var.index), symbols)
    assert genes.columns[0] == "symbol" and list(genes["symbol"]) == ["TP53", "ENSG2", "MYC"]
    de = pd.DataFrame({"symbol": ["MYC", "TP53", "ENSG2"], "lfsr": [0.01, 0.2, 0.9]},
                      index=pd.Index(["ENSG3", "ENSG1", "ENSG2"], name="gene"))
    cells = pd.DataFrame({"depth": [1.0, 2.0]}, index=pd.Index(["c0", "c1"], name="cell"))
    result = result_anndata(cells, genes, _record(), {"condition_treated_vs_control": de})
    result.write_h5ad(tmp_path / "scnbvi.h5ad")
    back = ad.read_h5ad(tmp_path / "scnbvi.h5ad")
    assert list(back.var["scnbvi_symbol"]) == ["TP53", "ENSG2", "MYC"]
    table = back.varm["scnbvi_de_condition_treated_vs_control"]
    assert list(table.index) == ["ENSG1", "ENSG2", "ENSG3"]
    assert list(table["symbol"]) == ["TP53", "ENSG2", "MYC"] and list(table["lfsr"]) == [0.2, 0.9, 0.01]


def test_a_missing_symbol_column_stops_the_load_naming_the_column(tmp_path):
    path = write_h5ad(tmp_path / "in.h5ad", np.ones((3, 2), dtype=np.int32), var={"feature_name": ["A", "B"]})
    assert list(read_counts(path, gene_symbols="feature_name").var["feature_name"]) == ["A", "B"]
    with pytest.raises(InputError) as error:
        read_counts(path, gene_symbols="gene_symbols")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: var['gene_symbols']: no such column")
    assert "['feature_name']" in message and "load.gene_symbols" in message


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o077, 0o600), (0o022, 0o644)])
def test_result_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        write_json({"a": 1}, tmp_path / "x.json")
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "x.tsv")
        with atomic_output(tmp_path / "x.nc") as temporary:
            temporary.write_bytes(b"draws")
    finally:
        os.umask(previous)
    for name in ("x.json", "x.tsv", "x.nc"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_current_umask_without_proc(monkeypatch):
    previous = os.umask(0o027)
    try:
        monkeypatch.setattr("scnbvi.outputs.Path.read_text", lambda self: (_ for _ in ()).throw(OSError()))
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(previous)


def test_gene_table_names_dispersion_as_deseq2_and_its_inverse_as_scvi_tools():
    alpha = np.array([[[0.5, 2.0], [1.0, 4.0], [2.0, 4.0]]])  # 1 chain x 3 draws x 2 genes
    idata = az.from_dict(posterior={"gene_effect": np.zeros((1, 3, 2)), "alpha": alpha},
                         coords={"gene": ["g0", "g1"]}, dims={"gene_effect": ["gene"], "alpha": ["gene"]})
    genes = gene_table(idata, gene_counts(sp.csr_matrix(np.ones((2, 2))), ["g0", "g1"]))
    np.testing.assert_allclose(genes["dispersion_mean"], [np.mean([2.0, 1.0, 0.5]), np.mean([0.5, 0.25, 0.25])])
    np.testing.assert_allclose(genes["inverse_dispersion_mean"], [3.5 / 3, 10.0 / 3])
    np.testing.assert_allclose(genes["dispersion_sd"], [np.std([2.0, 1.0, 0.5]), np.std([0.5, 0.25, 0.25])])


def test_trace_statistics_are_arvizs_mean_sd_and_highest_density_interval():
    rng = np.random.default_rng(0)
    posterior = xr.Dataset(
        {"gene_effect": (("chain", "draw", "gene"), rng.gamma(2.0, 1.0, (1, 400, 30)).astype(np.float32)),
         "mu_gene": (("chain", "draw"), rng.normal(size=(1, 400))),
         "beta": (("chain", "draw", "gene", "coefficient"), rng.normal(size=(1, 400, 30, 2)))},
        coords={"gene": [f"g{i}" for i in range(30)], "coefficient": ["a", "b"]},
    )
    statistics = draw_statistics(posterior)
    hdi = az.hdi(posterior, hdi_prob=az.rcParams["stats.ci_prob"], multimodal=False)
    for name in posterior.data_vars:
        np.testing.assert_array_equal(statistics[name].sel(statistic="hdi_3%").values, hdi[name].sel(hdi="lower").values)
        np.testing.assert_array_equal(statistics[name].sel(statistic="hdi_97%").values, hdi[name].sel(hdi="higher").values)
        np.testing.assert_allclose(statistics[name].sel(statistic="mean").values,
                                   posterior[name].mean(("chain", "draw")).values, rtol=1e-6)
        np.testing.assert_allclose(statistics[name].sel(statistic="sd").values,
                                   posterior[name].std(("chain", "draw"), ddof=1).values, rtol=1e-6)
    assert statistics.attrs["draws"] == 400


def test_read_trace_gives_the_groups_arviz_reads(tmp_path):
    rng = np.random.default_rng(1)
    idata = az.from_dict(posterior={"gene_effect": rng.normal(size=(1, 20, 4)), "mu_gene": rng.normal(size=(1, 20))},
                         coords={"gene": ["a", "b", "c", "d"]}, dims={"gene_effect": ["gene"]})
    idata.add_groups({STATISTICS_GROUP: draw_statistics(idata.posterior)})
    idata.posterior.attrs["engine"] = "jax"
    write_trace(idata, tmp_path / "trace.nc")

    groups, expected = read_trace(tmp_path / "trace.nc"), az.from_netcdf(tmp_path / "trace.nc")
    assert sorted(groups) == sorted(expected.groups()) == ["posterior", STATISTICS_GROUP]
    for name in groups:
        xr.testing.assert_identical(groups[name], expected[name])
    assert groups["posterior"].attrs["engine"] == "jax"
    xr.testing.assert_identical(posterior_statistics(groups), posterior_statistics(expected))
    pd.testing.assert_frame_equal(posterior_summary(groups), posterior_summary(expected))
