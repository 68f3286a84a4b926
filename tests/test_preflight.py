"""The checks as a run starts (scnbvi.preflight) and the lines that close a successful run
(scnbvi.run_report)."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from snakemake.utils import validate

from conftest import REPO, SHARED_DATA, write_h5ad, write_zarr
from scnbvi.design import design_from_config
from scnbvi.errors import InputError
from scnbvi.preflight import design_error, read_obs
from scnbvi.run_report import run_report

N_CELLS = 40


def _obs(**extra) -> dict:
    return {"condition": ["control", "treated"] * (N_CELLS // 2), "donor": [f"d{i // 2 % 4}" for i in range(N_CELLS)],
            "score": np.linspace(0, 1, N_CELLS), **extra}


def _file(tmp_path, obs=None) -> str:
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (N_CELLS, 6)).astype(np.float32))
    return write_h5ad(tmp_path / "cells.h5ad", counts, obs=obs or _obs())


def _settings(dataset: dict) -> dict:
    """A data set's section as the workflow sees it: validated, with the schema's defaults."""
    config = {"datasets": {"bad": dataset}}
    validate(config, schema=str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return config["datasets"]["bad"]


def _covariates_rule_error(path: str, settings: dict) -> str:
    with pytest.raises(InputError) as raised:
        design_from_config(read_obs(path), settings["design"], settings["contrasts"])
    return str(raised.value)


BAD_DESIGNS = {
    "misspelled column": ({"design": {"categorical": ["conditon"]}}, "obs has no column 'conditon'"),
    "unknown level": ({"design": {"categorical": ["condition"]}, "contrasts": [["condition", "treatd", "control"]]},
                      "'treatd' is not a level of 'condition'"),
    "unknown reference": ({"design": {"categorical": ["condition"], "reference": {"condition": "ctrl"}}},
                          "'ctrl' is not a level of obs['condition']"),
}


@pytest.mark.parametrize("kind", sorted(BAD_DESIGNS))
def test_a_bad_design_gives_the_covariates_rules_message_naming_the_data_set(tmp_path, kind):
    dataset, words = BAD_DESIGNS[kind]
    path = _file(tmp_path)
    settings = _settings({"path": path, **dataset})

    error = design_error("bad", settings)

    assert error == f"scnbvi error in data set bad ({path}), before any job: {_covariates_rule_error(path, settings)}"
    assert words in error and "; fix: " in error and "\n" not in error


def test_missing_values_stop_unless_slice_obs_filters_drop_those_cells(tmp_path):
    score = np.linspace(0, 1, N_CELLS)
    score[3] = np.nan
    path = _file(tmp_path, _obs(score=score, keep=["no" if i == 3 else "yes" for i in range(N_CELLS)]))

    error = design_error("bad", _settings({"path": path, "design": {"continuous": ["score"]}}))
    assert error.endswith("config: design: obs['score'] has 1 missing values (first: cell 'c3'); fix: fill them, "
                          "drop those cells with slice.obs_filters, or remove the column")
    filtered = {"path": path, "design": {"continuous": ["score"]}, "slice": {"obs_filters": {"keep": ["yes"]}}}
    assert design_error("bad", _settings(filtered)) is None


def test_a_nested_condition_says_which_column_nests_which_and_to_name_the_samples_under_random(tmp_path):
    path = _file(tmp_path, _obs(condition=["control" if i % 4 < 2 else "treated" for i in range(N_CELLS)]))

    error = design_error("bad", _settings({"path": path, "design": {"categorical": ["condition", "donor"]}}))

    assert "obs['condition'] is nested in obs['donor']" in error
    assert "fix: move 'donor' from design.categorical to design.random" in error
    assert design_error("bad", _settings({"path": path, "design": {"categorical": ["condition"],
                                                                    "random": ["donor"]}})) is None


def test_columns_the_workflow_adds_and_inputs_it_cannot_read_are_left_to_their_rules(tmp_path):
    path = _file(tmp_path)
    added = {"continuous": ["total_counts", "S_score"], "categorical": ["condition", "phase"]}
    cell_cycle = {"s_genes": "s.txt", "g2m_genes": "g2m.txt"}
    assert design_error("bad", _settings({"path": path, "design": added, "cell_cycle": cell_cycle,
                                          "contrasts": [["phase", "S", "G1"]]})) is None
    # Without the cell_cycle section its columns are not made: the covariates rule would stop.
    assert "obs has no column 'phase'" in design_error("bad", _settings({"path": path, "design": added}))
    # A filter that keeps no cell: the slice rule's error, not a design one.
    emptied = {"path": path, "slice": {"obs_filters": {"condition": ["none of them"]}}}
    assert design_error("bad", _settings(emptied)) is None
    (tmp_path / "text.h5ad").write_text("not HDF5")
    for dataset in ({}, {"path": str(tmp_path / "absent.h5ad")}, {"path": str(tmp_path / "text.h5ad")}):
        assert design_error("bad", _settings({**dataset, "design": {"categorical": ["x"]}})) is None


def test_read_obs_is_the_obs_that_the_covariates_rule_reads(tmp_path):
    path = _file(tmp_path)
    pd.testing.assert_frame_equal(read_obs(path), ad.read_h5ad(path).obs)
    write_zarr(ad.read_h5ad(path), tmp_path / "cells.zarr")
    pd.testing.assert_frame_equal(read_obs(tmp_path / "cells.zarr"), ad.read_h5ad(path).obs)
    bad = {"design": {"categorical": ["conditon"]}}
    assert "obs has no column 'conditon'" in design_error("bad", _settings({"path": str(tmp_path / "cells.zarr"),
                                                                            **bad}))
    (tmp_path / "empty.zarr").mkdir()
    assert design_error("bad", _settings({"path": str(tmp_path / "empty.zarr"), **bad})) is None


@pytest.mark.shared_data("microglia_20k.h5ad")
def test_read_obs_reads_no_counts(tmp_path):
    obs = read_obs(SHARED_DATA / "microglia_20k.h5ad")
    assert obs.shape[0] == 20_000


def test_the_module_prints_one_line_per_bad_data_set_and_exits_1(tmp_path):
    path = _file(tmp_path)
    config = {"datasets": {"good": {"path": path}, "sim": {}, "bad": {"path": path,
                                                                      "design": {"categorical": ["conditon"]}}}}
    validate(config, schema=str(REPO / "workflow" / "schemas" / "config.schema.yaml"))

    result = subprocess.run([sys.executable, "-m", "scnbvi.preflight"], input=json.dumps(config), capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO / "src")}, timeout=120)

    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [design_error("bad", config["datasets"]["bad"])]


# ------------------------------------------------------------ the lines that close a run

def _results(tmp_path, name, converged=True, outside=None) -> None:
    out = tmp_path / name
    out.mkdir(parents=True)
    stop = "converged (plateau rule, tolerance 0.001)" if converged else \
        "reached max_iterations=500 without converging"
    (out / "fit_stats.json").write_text(json.dumps({"steps": 500, "converged": int(converged), "stop_reason": stop}))
    if outside is not None:
        (out / "ppc.json").write_text(json.dumps({
            "genes_outside_band": {"zero_fraction": outside, "mean": 0.02, "variance": 0.05},
            "expected_outside_band_if_the_model_fits": 0.1, "verdict": "VERDICT"}))


def test_run_report_says_per_data_set_how_the_fit_went_and_where_the_results_are(tmp_path):
    _results(tmp_path, "good", outside=0.04)
    _results(tmp_path, "misfit", outside=0.31)
    _results(tmp_path, "short", converged=False)

    lines = run_report(tmp_path, ["good", "misfit", "short", "not_fitted"])

    assert lines == [
        f"scnbvi: good: fit converged after 500 steps; predictive check: VERDICT; results in {tmp_path}/good/",
        f"scnbvi: misfit: fit converged after 500 steps; predictive check: VERDICT; warning: zero fraction outside "
        f"its band for 31 % of genes, past the 10 % expected if the model fits (see {tmp_path}/misfit/ppc_*.png); "
        f"results in {tmp_path}/misfit/",
        "scnbvi: short: warning: fit reached max_iterations=500 without converging, its estimates may be off; "
        f"no predictive check yet; results in {tmp_path}/short/",
    ]
