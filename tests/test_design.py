"""The design (obs columns to covariates), its checks, and differential expression tables."""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from scnbvi.de import contrast_table
from scnbvi.design import build_design, design_from_config, read_design, write_design
from scnbvi.errors import InputError
from scnbvi.naming import contrast_name


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
    np.testing.assert_array_equal(again.level_mask("batch", "b1"), obs["batch"].eq("b1").to_numpy())


def _draws_idata(means, sds, coefficients, draws=2000, seed=0):
    """A posterior of beta (genes x coefficients) with independent normal draws."""
    rng = np.random.default_rng(seed)
    means, sds = np.atleast_2d(means), np.atleast_2d(sds)
    beta = rng.normal(means[None], sds[None], (draws, *means.shape))[None]
    genes = [f"g{i}" for i in range(means.shape[0])]
    return az.from_dict(posterior={"beta": beta}, coords={"gene": genes, "coefficient": list(coefficients)},
                        dims={"beta": ["gene", "coefficient"]})


def test_contrast_table_shrinks_null_genes_and_keeps_real_effects():
    obs = _obs()
    design = build_design(obs, categorical=["condition"])
    rng = np.random.default_rng(0)
    n_genes = 400
    effect = np.where(np.arange(n_genes) < 20, 1.0, 0.0)  # natural log: 20 genes up by e
    means = (effect + rng.normal(0.0, 0.05, n_genes))[:, None]
    idata = _draws_idata(means, np.full((n_genes, 1), 0.05), ["condition[drug]"])
    counts = sp.csr_matrix(rng.poisson(1.0, (12, n_genes)))
    result = contrast_table(idata, design, ("condition", "drug", "ctrl"), counts, np.full(12, 2.0))
    table = result.table
    assert result.replicates == "cells" and result.units == {"drug": 5, "ctrl": 7}
    assert table["lfsr"].is_monotonic_increasing
    called = table.index[table["lfsr"] < 0.05]
    assert set(called) == {f"g{i}" for i in range(20)}
    # The unshrunk estimate is the draws' mean in log2 (after the median shift, near 0 here).
    draws = idata.posterior["beta"].values[0, :, :, 0] / np.log(2)
    unshrunk = table["log2_fold_change_unshrunk"].reindex([f"g{i}" for i in range(n_genes)])
    np.testing.assert_allclose(unshrunk + result.composition_shift, draws.mean(axis=0), atol=1e-9)
    assert abs(result.composition_shift) < 0.02
    # Real effects keep their size; null genes shrink towards zero.
    assert table.loc["g0", "log2_fold_change"] == pytest.approx(1 / np.log(2), abs=0.1)
    nulls = table.index[~table.index.isin(called)]
    assert (table.loc[nulls, "log2_fold_change"].abs() <= table.loc[nulls, "log2_fold_change_unshrunk"].abs()).all()
    hits = table.loc[called]
    assert ((hits["ci95_low"] < hits["log2_fold_change"]) & (hits["log2_fold_change"] < hits["ci95_high"])).all()
    # A null gene's interval holds 0 (for most, it is the point mass: 0 to 0).
    assert ((table.loc[nulls, "ci95_low"] <= 1e-9) & (table.loc[nulls, "ci95_high"] >= -1e-9)).all()
    assert table.loc["g0", "prob_large_change"] > 0.99 and table.loc[nulls, "prob_large_change"].max() < 0.05
    # expressed cells and base means from the counts
    assert table.loc["g3", "cells_expressing_drug"] == int((counts[7:, 3].toarray() > 0).sum())
    assert table.loc["g3", "base_mean"] == pytest.approx(counts[:, 3].mean())
    flipped = contrast_table(idata, design, ("condition", "ctrl", "drug"), counts, np.full(12, 2.0)).table
    assert flipped.loc["g0", "log2_fold_change"] == pytest.approx(-table.loc["g0", "log2_fold_change"], rel=1e-6)
    assert contrast_name("cell type", "T/NK", "B") == "cell_type_T_NK_vs_B"


def test_a_shift_shared_by_every_gene_gives_no_calls():
    """Composition: when a few genes change, every other gene's depth-normalised level moves by the
    same small amount; with thousands of cells that shift is 'significant' for every gene."""
    design = build_design(_obs(), categorical=["condition"])
    rng = np.random.default_rng(1)
    n_genes = 500
    shift = 0.05 + rng.normal(0.0, 0.01, n_genes)
    idata = _draws_idata(shift[:, None], np.full((n_genes, 1), 0.01), ["condition[drug]"])
    counts = sp.csr_matrix(np.ones((12, n_genes)))
    args = (idata, design, ("condition", "drug", "ctrl"), counts, np.full(12, 2.0))
    kept = contrast_table(*args, centre="none").table
    assert (kept["lfsr"] < 0.05).mean() > 0.9
    centred = contrast_table(*args)
    assert (centred.table["lfsr"] < 0.05).sum() == 0
    assert centred.composition_shift == pytest.approx(0.05 / np.log(2), abs=0.005)


def _donor_obs(n_donors=6, cells_per_donor=20):
    donor = np.repeat([f"d{i}" for i in range(n_donors)], cells_per_donor)
    return pd.DataFrame({
        "donor": donor,
        "condition": np.where(np.repeat(np.arange(n_donors), cells_per_donor) < n_donors // 2, "ctrl", "drug"),
        "batch": np.tile(["b1", "b2"], len(donor) // 2),
        "age": np.repeat(np.linspace(20, 70, n_donors), cells_per_donor),
    }, index=[f"c{i}" for i in range(len(donor))])


def test_columns_constant_within_samples_move_to_the_sample_level():
    obs = _donor_obs()
    design = build_design(obs, categorical=["condition", "batch"], continuous=["age"], random=["donor"])
    assert design.names == ("batch[b2]", "donor[d1]", "donor[d2]", "donor[d3]", "donor[d4]", "donor[d5]")
    assert design.n_sample_coefficients == 5
    samples = design.samples
    assert samples.levels == ("d0", "d1", "d2", "d3", "d4", "d5") and samples.names == ("condition[drug]", "age")
    np.testing.assert_array_equal(samples.matrix[:, 0], [0, 0, 0, 1, 1, 1])
    assert design.is_sample_level("condition") and not design.is_sample_level("batch")
    assert design.sample_indicator_positions() == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(design.sample_of_cells(), np.repeat(np.arange(6), 20))
    np.testing.assert_array_equal(design.level_mask("condition", "drug"), obs["condition"].eq("drug").to_numpy())
    for column in ("condition", "batch"):
        np.testing.assert_array_equal(design.level_of_cells(column), obs[column].to_numpy())
    np.testing.assert_array_equal(design.contrast_weights("condition", "ctrl", "drug"), [-1.0, 0.0])


def test_a_sample_design_round_trips_through_its_file(tmp_path):
    obs = _donor_obs()
    design = build_design(obs, categorical=["condition", "batch"], random=["donor"])
    write_design(design, tmp_path / "design.json")
    again = read_design(tmp_path / "design.json", design.table(obs.index))
    assert (again.samples.column, again.samples.levels, again.samples.names, again.samples.factors) == (
        design.samples.column, design.samples.levels, design.samples.names, design.samples.factors)
    np.testing.assert_array_equal(again.samples.matrix, design.samples.matrix)
    np.testing.assert_array_equal(again.level_mask("condition", "ctrl"), design.level_mask("condition", "ctrl"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"categorical": ["condition", "donor"]}, r"constant within each level of obs\['donor'\].*design.random"),
        ({"categorical": ["condition"], "random": ["donor", "batch"]}, "one sample column is supported"),
        ({"categorical": ["condition"], "random": ["batch"]}, "2 samples"),
        ({"categorical": ["condition"], "continuous": ["age"], "random": ["donor"], "n_donors": 3},
         "no spread between samples"),
    ],
    ids=["nested-as-fixed", "two-random", "too-few-samples", "no-residual-df"],
)
def test_sample_designs_that_cannot_be_fitted_stop_with_one_line(kwargs, message):
    kwargs = dict(kwargs)
    obs = _donor_obs(kwargs.pop("n_donors", 6))
    with pytest.raises(InputError, match=message) as error:
        build_design(obs, **kwargs)
    assert "\n" not in str(error.value) and "fix:" in str(error.value)


def test_a_condition_nested_in_an_unnamed_sample_column_is_warned_about(caplog):
    obs = _donor_obs()
    settings = {"categorical": ["condition"], "continuous": [], "reference": {}}
    with caplog.at_level("WARNING", logger="scnbvi.progress"):
        design_from_config(obs, settings)
    assert "obs['condition'] is constant within each level of obs['donor']" in caplog.text
    assert "design.random" in caplog.text


def test_a_column_with_a_level_for_every_few_cells_is_refused_and_many_levels_warned_about(caplog):
    obs = pd.DataFrame({"barcode": [f"b{i // 2}" for i in range(1000)], "type": [f"t{i % 60}" for i in range(1000)]},
                       index=[f"c{i}" for i in range(1000)])
    with pytest.raises(InputError, match=r"obs\['barcode'\] has 500 levels for 1000 cells.*design.random"):
        build_design(obs, categorical=["barcode"])
    with pytest.raises(InputError, match="500 levels"):
        build_design(obs.assign(condition=["a", "b"] * 500), categorical=["condition"], random=["barcode"])
    with caplog.at_level("WARNING", logger="scnbvi.progress"):
        design = build_design(obs, categorical=["type"])
    assert design.n_coefficients == 59 and "obs['type'] has 60 levels, 59 coefficients per gene" in caplog.text
