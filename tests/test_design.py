"""The design (obs columns to covariates), its checks, and differential expression tables."""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from scnbvi.de import contrast_table, level_mask
from scnbvi.design import build_design, contrast_name, design_from_config, read_design, write_design
from scnbvi.errors import InputError


def _obs(n=12):
    return pd.DataFrame(
        {
            "condition": ["ctrl"] * 7 + ["drug"] * 5,
            "batch": (["b1", "b2", "b3"] * 4)[:n],
            "mito": np.linspace(1.0, 12.0, n),
            "S_score": np.r_[np.full(6, 0.1), np.full(6, -0.2)] + np.linspace(0, 0.1, n),
        },
        index=[f"c{i}" for i in range(n)],
    )


def test_categorical_levels_get_indicators_against_the_most_frequent_level():
    design = build_design(_obs(), categorical=["condition", "batch"], continuous=["mito"])
    assert design.names == ("condition[drug]", "batch[b2]", "batch[b3]", "mito")
    assert design.factors == {"condition": ("ctrl", ("drug",)), "batch": ("b1", ("b2", "b3"))}
    np.testing.assert_array_equal(design.matrix[:, 0], [0] * 7 + [1] * 5)
    np.testing.assert_array_equal(design.matrix[:3, 1:3], [[0, 0], [1, 0], [0, 1]])
    mito = design.matrix[:, 3]
    assert abs(mito.mean()) < 1e-12 and mito.std() == pytest.approx(1.0)
    assert design.scales["mito"] == pytest.approx((6.5, np.linspace(1, 12, 12).std()))


def test_reference_level_can_be_chosen():
    design = build_design(_obs(), categorical=["condition"], reference={"condition": "drug"})
    assert design.names == ("condition[ctrl]",)
    np.testing.assert_array_equal(design.matrix[:, 0], [1] * 7 + [0] * 5)


@pytest.mark.parametrize(
    "obs_change, kwargs, message",
    [
        (None, {"categorical": ["nope"]}, "obs has no column 'nope'"),
        (lambda o: o.assign(condition="ctrl"), {"categorical": ["condition"]}, "one level only"),
        (lambda o: o.assign(mito=np.where(o.index == "c3", np.nan, o["mito"])), {"continuous": ["mito"]},
         "1 missing values"),
        (lambda o: o.assign(group=o["condition"].map({"ctrl": "x", "drug": "y"})),
         {"categorical": ["condition", "group"]}, "confounded"),
        (None, {"continuous": ["condition"]}, "not numeric"),
        (lambda o: o.assign(mito=3.0), {"continuous": ["mito"]}, "one value only"),
        (None, {"categorical": ["condition"], "reference": {"condition": "placebo"}}, "'placebo' is not a level"),
        (lambda o: o.assign(twice=2 * o["mito"]), {"continuous": ["mito", "twice"]}, "linearly dependent"),
    ],
    ids=["missing", "one-level", "missing-values", "confounded", "text-as-continuous", "constant",
         "unknown-reference", "dependent"],
)
def test_unidentifiable_designs_stop_with_one_line(obs_change, kwargs, message):
    obs = obs_change(_obs()) if obs_change else _obs()
    with pytest.raises(InputError, match=message) as error:
        build_design(obs, **kwargs)
    assert "\n" not in str(error.value) and "fix:" in str(error.value)


def test_contrasts_are_checked_against_the_design_before_fitting():
    settings = {"categorical": ["batch"], "continuous": [], "reference": {}}
    design = design_from_config(_obs(), settings, [["batch", "b3", "b2"]])
    np.testing.assert_array_equal(design.contrast_weights("batch", "b3", "b2"), [-1.0, 1.0])
    np.testing.assert_array_equal(design.contrast_weights("batch", "b3", "b1"), [0.0, 1.0])
    np.testing.assert_array_equal(design.contrast_weights("batch", "b1", "b2"), [-1.0, 0.0])
    with pytest.raises(InputError, match=r"contrasts\[1\].*'b9' is not a level of 'batch'"):
        design_from_config(_obs(), settings, [["batch", "b3", "b2"], ["batch", "b9", "b1"]])
    with pytest.raises(InputError, match="'mito' is not a categorical design column"):
        design_from_config(_obs(), settings, [["mito", "1", "2"]])


def test_design_round_trips_through_its_files(tmp_path):
    obs = _obs()
    design = build_design(obs, categorical=["batch"], continuous=["mito", "S_score"])
    write_design(design, tmp_path / "design.json")
    cells = design.table(obs.index).assign(depth=1.0)
    again = read_design(tmp_path / "design.json", cells)
    assert again.names == design.names and again.factors == design.factors
    np.testing.assert_array_equal(again.matrix, design.matrix)
    np.testing.assert_array_equal(level_mask(again, "batch", "b1"), obs["batch"].eq("b1").to_numpy())


def test_contrast_table_reads_log2_fold_changes_and_sign_rates_off_the_draws():
    obs = _obs()
    design = build_design(obs, categorical=["condition"])
    rng = np.random.default_rng(0)
    draws = 4000
    # gene a: clearly up (log fold change 1.0 +- 0.1); gene b: centred at zero; gene c: down.
    beta = np.stack([rng.normal(m, 0.1, draws) for m in (1.0, 0.0, -0.3)])[None, :, :, None].transpose(0, 2, 1, 3)
    idata = az.from_dict(posterior={"beta": beta}, coords={"gene": ["a", "b", "c"], "coefficient": ["condition[drug]"]},
                         dims={"beta": ["gene", "coefficient"]})
    counts = sp.csr_matrix(np.r_[np.tile([[1, 0, 2]], (7, 1)), np.tile([[3, 1, 0]], (5, 1))])
    table = contrast_table(idata, design, ("condition", "drug", "ctrl"), counts, np.full(12, 2.0), lfc_threshold=0.5)
    assert list(table.index) == ["a", "c", "b"]  # sorted by lfsr
    assert table.loc["a", "log2_fold_change"] == pytest.approx(1.0 / np.log(2), abs=0.01)
    assert table.loc["a", "lfsr"] < 1e-20 and table.loc["a", "prob_large_change"] == pytest.approx(1.0)
    assert 0.4 < table.loc["b", "lfsr"] <= 0.5 and table.loc["c", "lfsr"] < 0.01
    # the Gaussian tail of gene c: mean -0.3, sd 0.1 on the natural-log scale
    assert table.loc["c", "lfsr"] == pytest.approx(stats.norm.cdf(-3.0), rel=0.1)
    assert table.loc["a", "ci95_low"] < table.loc["a", "log2_fold_change"] < table.loc["a", "ci95_high"]
    assert table.loc["a", "cells_expressing_drug"] == 5 and table.loc["a", "cells_expressing_ctrl"] == 7
    assert table.loc["b", "cells_expressing_ctrl"] == 0
    assert table.loc["c", "base_mean"] == pytest.approx(14 / 12)
    flipped = contrast_table(idata, design, ("condition", "ctrl", "drug"), counts, np.full(12, 2.0))
    assert flipped.loc["a", "log2_fold_change"] == pytest.approx(-table.loc["a", "log2_fold_change"])
    assert contrast_name("cell type", "T/NK", "B") == "cell_type_T_NK_vs_B"
