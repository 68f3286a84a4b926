"""scnbvi.merge: the results joined onto the user's own AnnData by name, and the whole path from a
scanpy or CELLxGENE file to that merged object, gene symbols included."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scnbvi
from conftest import REPO, SMALL_SIMULATED, make_adata, snakemake, write_config
from scnbvi.errors import InputError
from scnbvi.simulate import SimulationTruth, simulate_counts
from scnbvi.summary import result_anndata

CONTRAST = "condition_treated_vs_control"


def _results(tmp_path, genes=("ENSG1", "ENSG2", "ENSG3")):
    """A results folder holding a scnbvi.h5ad of cells c0, c1, c3 and the given genes."""
    cells = pd.DataFrame({"cell_effect_mean": [0.1, -0.2, 0.3], "depth": [10.0, 20, 30]},
                         index=pd.Index(["c0", "c1", "c3"], name="cell"))
    table = pd.DataFrame({"symbol": [f"S{i}" for i in range(len(genes))], "log_expression_mean": 1.5},
                         index=pd.Index(list(genes), name="gene"))
    de = table[["symbol"]].assign(lfsr=np.linspace(0.01, 0.5, len(genes))).iloc[::-1]
    folder = tmp_path / "results" / "mine"
    folder.mkdir(parents=True)
    record = {"convergence": {"converged": 1, "steps": 300}, "code_version": {"scnbvi_version": scnbvi.__version__}}
    result_anndata(cells, table, record, {CONTRAST: de}).write_h5ad(folder / "scnbvi.h5ad")
    return folder


def _users_adata():
    """Four genes (one not fitted), five cells (two not fitted), columns of its own."""
    return make_adata(sp.csr_matrix(np.ones((5, 4))), obs={"depth": [1.0, 2, 3, 4, 5]},
                      var={"feature_name": ["A", "B", "C", "D"]}).copy()


def _with_ensembl_ids(adata):
    adata.var_names = ["ENSG1", "ENSG2", "ENSG3", "ENSG4"]
    return adata


def test_merge_joins_columns_contrasts_and_provenance_onto_a_copy(tmp_path):
    folder = _results(tmp_path)
    adata = _with_ensembl_ids(_users_adata())
    merged = scnbvi.merge(adata, folder)
    assert list(adata.obs.columns) == ["depth"] and not adata.varm and "scnbvi" not in adata.uns
    np.testing.assert_array_equal(merged.obs["scnbvi_depth"], [10, 20, np.nan, 30, np.nan])
    assert list(merged.var["scnbvi_symbol"].astype(object).fillna("-")) == ["S0", "S1", "S2", "-"]
    table = merged.varm[f"scnbvi_de_{CONTRAST}"]
    assert list(table.index) == list(merged.var_names)
    np.testing.assert_allclose(table["lfsr"], [0.01, 0.255, 0.5, np.nan])
    assert merged.uns["scnbvi"]["convergence"]["steps"] == 300
    assert merged.X.shape == (5, 4)

    merged.write_h5ad(tmp_path / "merged.h5ad")
    back = ad.read_h5ad(tmp_path / "merged.h5ad")
    pd.testing.assert_frame_equal(back.obs, merged.obs)
    pd.testing.assert_frame_equal(back.var, merged.var)
    pd.testing.assert_frame_equal(back.varm[f"scnbvi_de_{CONTRAST}"], table)
    assert back.uns["scnbvi"]["code_version"]["scnbvi_version"] == scnbvi.__version__


def test_merging_again_replaces_the_earlier_results(tmp_path):
    folder = _results(tmp_path)
    once = scnbvi.merge(_with_ensembl_ids(_users_adata()), folder / "scnbvi.h5ad")
    twice = scnbvi.merge(once, folder)
    assert list(twice.obs.columns) == list(once.obs.columns)
    assert list(twice.var.columns) == list(once.var.columns)


@pytest.mark.parametrize("axis", ["obs", "var"])
def test_other_names_are_refused_with_their_count_and_an_example(tmp_path, axis):
    folder = _results(tmp_path)
    adata = _with_ensembl_ids(_users_adata())
    if axis == "var":
        adata.var_names = ["TP53", "MYC", "ENSG3", "GAPDH"]
    else:
        adata.obs_names = ["c0", "x1", "x2", "x3", "x4"]
    with pytest.raises(InputError) as error:
        scnbvi.merge(adata, folder)
    message = str(error.value)
    assert "\n" not in message
    assert f"{axis}_names: 2 of the 3 fitted names are not in your AnnData's {axis}_names" in message
    assert "(e.g. 'ENSG1')" in message or "(e.g. 'c1')" in message
    assert f"{axis}_names_make_unique()" in message


def test_a_folder_without_results_is_refused(tmp_path):
    with pytest.raises(InputError, match="scnbvi.h5ad: file: file not found"):
        scnbvi.merge(_users_adata(), tmp_path)


def test_import_scnbvi_loads_no_scientific_package():
    code = "import sys, scnbvi; assert callable(scnbvi.merge); print(sorted({'numpy', 'pandas', 'anndata'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO / "src", capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _user_files(directory):
    """The simulated counts as a scanpy user keeps them (counts in layers["counts"], normalised X,
    symbols as var_names) and as CELLxGENE does (counts in .raw, Ensembl ids as var_names, symbols
    in var["feature_name"])."""
    counts = simulate_counts(300, 40, 3, SimulationTruth(condition_effect_sd=0.7))
    normalised = sp.csr_matrix(np.log1p(counts.X / counts.X.sum(axis=1) * 1e4))
    scanpy = ad.AnnData(X=normalised, obs=counts.obs, var=counts.var[["length"]], layers={"counts": counts.X})
    ensembl = [f"ENSG{index:011d}" for index in range(counts.n_vars)]
    var = pd.DataFrame({"feature_name": pd.Categorical(counts.var_names), "length": counts.var["length"].to_numpy()},
                       index=ensembl)
    cellxgene = ad.AnnData(X=normalised, obs=counts.obs, var=var)
    cellxgene.raw = ad.AnnData(X=counts.X, obs=counts.obs, var=var)
    paths = {"scanpy": directory / "scanpy.h5ad", "cellxgene": directory / "cellxgene.h5ad"}
    scanpy.write_h5ad(paths["scanpy"])
    cellxgene.write_h5ad(paths["cellxgene"])
    return paths, list(counts.var_names)


@pytest.mark.slow
def test_scanpy_and_cellxgene_files_fit_and_merge_back_with_symbols(workflow_copy):
    paths, symbols = _user_files(workflow_copy)
    base = {key: value for key, value in SMALL_SIMULATED["datasets"]["sim"].items() if key != "simulate"}
    analysis = {"design": {"categorical": ["condition"], "reference": {"condition": "control"}},
                "contrasts": [["condition", "treated", "control"]], "de": {"centre": "none"}}
    loads = {"scanpy": {"layer": "counts"}, "cellxgene": {"layer": "raw", "gene_symbols": "feature_name"}}
    config = {**SMALL_SIMULATED, "datasets": {
        name: {**base, **analysis, "path": str(paths[name]), "load": loads[name]} for name in paths}}
    targets = [f"results/{name}/scnbvi.h5ad" for name in paths]
    result = snakemake(workflow_copy, *targets, "--configfile", write_config(workflow_copy, config))
    assert result.returncode == 0, result.stdout + result.stderr

    for name, path in paths.items():
        out = workflow_copy / "results" / name
        genes = pd.read_csv(out / "genes.tsv", sep="\t", index_col=0)
        de = pd.read_csv(out / "de" / f"{CONTRAST}.tsv", sep="\t", index_col=0)
        results = ad.read_h5ad(out / "scnbvi.h5ad")
        table = results.varm[f"scnbvi_de_{CONTRAST}"]
        pd.testing.assert_frame_equal(table.loc[de.index], de, check_names=False)
        assert list(results.uns["scnbvi"]["contrasts"][CONTRAST]) == ["condition", "treated", "control"]
        if name == "cellxgene":
            expected = dict(zip(genes.index, symbols))
            assert list(genes["symbol"]) == symbols and genes.columns[0] == "symbol"
            assert de.columns[0] == "symbol" and all(de["symbol"] == de.index.map(expected))
            assert list(results.var["scnbvi_symbol"]) == symbols
            assert list(table["symbol"]) == symbols
        else:
            assert "symbol" not in genes.columns and "symbol" not in de.columns and "symbol" not in table.columns

        merged = scnbvi.merge(ad.read_h5ad(path), out)
        merged.write_h5ad(out / "merged.h5ad")
        back = ad.read_h5ad(out / "merged.h5ad")
        np.testing.assert_allclose(back.var["scnbvi_log_expression_mean"], genes["log_expression_mean"])
        pd.testing.assert_frame_equal(back.varm[f"scnbvi_de_{CONTRAST}"], merged.varm[f"scnbvi_de_{CONTRAST}"])
        assert back.layers.keys() == merged.layers.keys() and (back.raw is not None) == (name == "cellxgene")
