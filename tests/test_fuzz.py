"""Property-based fuzzing of the path every data set takes (load, slice, covariates, fit) with small,
odd .h5ad files and random valid settings: each case ends in finite offsets and a finite loss, or
in one InputError line naming the source, the field and the fix, from a step that had a reason to
stop (valid input must go through). Nothing else may escape, and no count that the file does not
hold may reach the fit."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from scnbvi.data import read_counts_with_renames, read_selected_counts, write_selection
from scnbvi.errors import InputError
from scnbvi.inference import InferenceSettings, fit
from scnbvi.offsets import aligned_covariates, covariate_tables, write_covariates
from scnbvi.qc import apply_qc_actions, slice_counts

DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64")
# Names that trip up text formats, pandas or HDF5: repeats, unicode, empty, number-like, NA-like, separators.
NAMES = ("c", "c", "gene", "Gène", "细胞", "🧬", "", " ", "0", "1.5", "-1", "c-1", "nan", "NA", "None", "null",
         "x/y", "a\tb", "a,b", "line\nbreak", "'q'", '"q"', "#x")
# Stored values: counts, and values near the limits of each type or of float precision.
FLOAT_VALUES = (0.0, -0.0, 0.5, 2.5, -1.0, np.nan, np.inf, -np.inf, 1e10, 2.0**62, 2.0**63, 1e300, 5e-324)
OBS_DEPTHS = (1.0, 2.5e4, 1e5, 0.0, -3.0, np.nan, np.inf, 1e-320, 1e30)
VAR_LENGTHS = (1.0, 1500.0, 2e4, 0.0, -1.0, np.nan, np.inf, 1e-320)
FIT = InferenceSettings(max_iterations=20, check_every=10, draws=5)


def stored_values(dtype: str):
    """Values as stored in a matrix of ``dtype``: small counts, values that are no count, limits of the type."""
    small = st.integers(0, 20)
    if np.dtype(dtype).kind == "f":
        return st.one_of(small.map(float), st.sampled_from(FLOAT_VALUES))
    info = np.iinfo(dtype)
    limits = [info.max, info.max // 2 + 1] + ([-1, info.min] if info.min < 0 else [])
    return st.one_of(small, st.sampled_from(limits))


@st.composite
def h5ad_files(draw):
    """What to write: the shape, the stored layout and its entries, the names and the obs/var columns.

    Half the files hold small counts only, and an axis is empty now and then, so that many cases get
    as far as the fit (Hypothesis starts from the first choice of each draw, so that one is valid)."""
    sizes = st.sampled_from((2, 3, 1, 4, 5, 2, 3, 1, 0))
    n_cells, n_genes = draw(sizes), draw(sizes)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(("csr", "csc", "dense")))
    values = stored_values(dtype) if draw(st.booleans()) else st.integers(0, 20)
    cells, genes = range(max(n_cells, 1)), range(max(n_genes, 1))
    entries = [] if n_cells * n_genes == 0 else draw(
        st.lists(st.tuples(st.sampled_from(cells), st.sampled_from(genes), values), min_size=1, max_size=14))
    obs = {}
    if draw(st.booleans()):
        obs["depth"] = draw(st.lists(st.sampled_from(OBS_DEPTHS), min_size=n_cells, max_size=n_cells))
    if draw(st.booleans()):
        obs["group"] = pd.Categorical(draw(st.lists(st.sampled_from(("a", "b")), min_size=n_cells, max_size=n_cells)))
    var = {}
    unique = draw(st.booleans())
    if draw(st.booleans()):
        var["length"] = draw(st.lists(st.sampled_from(VAR_LENGTHS), min_size=n_genes, max_size=n_genes))
    return {
        "shape": (n_cells, n_genes), "dtype": dtype, "layout": layout, "entries": entries,
        "obs_names": draw(st.lists(st.sampled_from(NAMES), min_size=n_cells, max_size=n_cells, unique=unique)),
        "var_names": draw(st.lists(st.sampled_from(NAMES), min_size=n_genes, max_size=n_genes, unique=unique)),
        "obs": obs, "var": var,
    }


def optional_count():
    return st.one_of(st.none(), st.integers(1, 6))


@st.composite
def workflow_settings(draw):
    """Settings the config schema accepts for the load, slice and covariates sections, and the model's."""
    keep_drop = st.sampled_from(("keep", "drop"))
    # Choices that stop the run are the rarer ones, so that many cases reach the fit.
    load = {"zero_cells": draw(st.sampled_from(("drop", "keep"))), "zero_genes": draw(keep_drop),
            "duplicate_cells": draw(keep_drop),
            "duplicate_names": draw(st.sampled_from(("make_unique", "make_unique", "make_unique", "error")))}
    obs_filters = {}
    if draw(st.integers(0, 3)) == 3:
        obs_filters["group"] = draw(st.lists(st.sampled_from(("a", "b", "z", 1, True)), min_size=1, max_size=2))
    slice_ = {"cells_method": draw(st.sampled_from(("all", "first", "random"))), "n_cells": draw(optional_count()),
              "genes_method": draw(st.sampled_from(("all", "first", "random", "hvg"))),
              "n_genes": draw(optional_count()),
              "obs_filters": obs_filters, "drop_zero_cells": draw(st.booleans()),
              "drop_zero_genes": draw(st.booleans()), "seed": draw(st.integers(0, 3))}
    covariates = {
        "gene_length": {"source": draw(st.sampled_from(("none", "impute", "var"))), "path": None,
                        "attribute": "gene_id", "column": "length"},
        "depth": {"source": draw(st.sampled_from(("obs", "total_counts", "constant"))), "column": "depth",
                  "constant": draw(st.sampled_from((0.5, 1e4, 1e9))), "per_cell": draw(st.booleans())},
        "depth_ref": draw(st.sampled_from((1.0, 1e5, 1e9))),
        "length_ref": draw(st.sampled_from((1.0, 2000.0, 1e6))),
        "seed": draw(st.integers(0, 3)),
    }
    model = {"minibatch": draw(st.sampled_from(("cells", "entries"))), "gene_dispersion": draw(st.booleans())}
    return {"load": load, "slice": slice_, "covariates": covariates, "model": model}


# Settings that take a file of counts to the fit, for the fixed examples below.
PLAIN_SETTINGS = {
    "load": {"zero_cells": "drop", "zero_genes": "keep", "duplicate_cells": "keep", "duplicate_names": "make_unique"},
    "slice": {"cells_method": "all", "n_cells": None, "genes_method": "all", "n_genes": None, "obs_filters": {},
              "drop_zero_cells": False, "drop_zero_genes": False, "seed": 0},
    "covariates": {"gene_length": {"source": "none", "path": None, "attribute": "gene_id", "column": "length"},
                   "depth": {"source": "total_counts", "column": "depth", "constant": 1e4, "per_cell": True},
                   "depth_ref": 1e5, "length_ref": 2000.0, "seed": 0},
    "model": {"minibatch": "cells", "gene_dispersion": True},
}


def plain_file(entries, dtype="int32", obs_names=("c0", "c1")) -> dict:
    """A 2 x 2 CSR file with the given entries and no obs or var columns."""
    return {"shape": (2, 2), "dtype": dtype, "layout": "csr", "entries": entries, "obs_names": list(obs_names),
            "var_names": ["g0", "g1"], "obs": {}, "var": {}}


def write_h5ad(case: dict, path: Path) -> list[float]:
    """Write the case with anndata for obs and var, and X with h5py exactly as drawn (anndata would
    sum repeated entries and sort indices); returns the values as stored, after the cast to the dtype."""
    n_cells, n_genes = case["shape"]
    obs = pd.DataFrame(case["obs"], index=pd.Index(case["obs_names"], dtype=object))
    var = pd.DataFrame(case["var"], index=pd.Index(case["var_names"], dtype=object))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* names are not unique", category=UserWarning)
        ad.AnnData(obs=obs, var=var).write_h5ad(path)
    rows = np.array([row for row, _, _ in case["entries"]], dtype=np.int64)
    columns = np.array([column for _, column, _ in case["entries"]], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # casts of inf or NaN to an integer type never happen here
        values = np.array([value for _, _, value in case["entries"]]).astype(case["dtype"])
    with h5py.File(path, "a") as file:
        if case["layout"] == "dense":
            dense = np.zeros(case["shape"], dtype=case["dtype"])
            np.add.at(dense, (rows, columns), values)  # repeats add up, wrapping around as the type does
            file.create_dataset("X", data=dense)
            file["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            return list(dense.ravel())
        major, minor, n_major = (rows, columns, n_cells) if case["layout"] == "csr" else (columns, rows, n_genes)
        order = np.argsort(major, kind="stable")  # grouped by row (or column); within it, the order drawn
        group = file.create_group("X")
        group.attrs.update({"encoding-type": f"{case['layout']}_matrix", "encoding-version": "0.1.0",
                            "shape": np.array(case["shape"])})
        group.create_dataset("data", data=values[order])
        group.create_dataset("indices", data=minor[order].astype(np.int32))
        group.create_dataset("indptr", data=np.concatenate([[0], np.cumsum(np.bincount(major, minlength=n_major))]))
    return list(values)


def expected_counts(case: dict, stored: list) -> np.ndarray | None:
    """The counts the file means (repeats summed exactly), or None where it holds a value that is no count
    or a count beyond what a 64-bit integer holds."""
    if any(not np.isfinite(value) or value < 0 or value != np.round(value) for value in stored):
        return None
    counts = np.zeros(case["shape"], dtype=object)
    if case["layout"] == "dense":
        counts[:] = np.array([int(value) for value in stored], dtype=object).reshape(case["shape"])
    else:
        for (row, column, _), value in zip(case["entries"], stored):
            counts[row, column] += int(value)
    return None if counts.size and counts.max() > np.iinfo(np.int64).max else counts


def load_must_stop(case: dict, expected, duplicate_names: str) -> bool:
    """Whether the file cannot be loaded as counts: no cell or gene, a value that is no count, or a
    repeated name where repeats are refused."""
    n_cells, n_genes = case["shape"]
    repeated = any(len(set(case[names])) < len(case[names]) for names in ("obs_names", "var_names"))
    return n_cells * n_genes == 0 or expected is None or (duplicate_names == "error" and repeated)


def slice_cannot_stop(settings: dict) -> bool:
    """Settings under which slicing always keeps some cells and genes: no filter, no size that method
    all would ignore, no HVG (which needs two cells) and nothing dropped afterwards."""
    ignored_size = any(settings[f"{axis}_method"] == "all" and settings[f"n_{axis}"] is not None
                       for axis in ("cells", "genes"))
    return not (settings["obs_filters"] or ignored_size or settings["genes_method"] == "hvg"
                or settings["drop_zero_cells"] or settings["drop_zero_genes"])


def offsets_cannot_stop(settings: dict) -> bool:
    """Settings under which the offsets never depend on the file's values: a constant depth and no or
    imputed lengths, all within exp(30) of their references."""
    return settings["depth"]["source"] == "constant" and settings["gene_length"]["source"] in ("none", "impute")


@contextlib.contextmanager
def stops_only(when: bool | None, blaming: str = ""):
    """Around one step: it must stop with an InputError where ``when`` is True and must go through
    where it is False; where it is None (the step's outcome depends on more than the case says),
    a stop must blame the settings under ``blaming``."""
    try:
        yield
    except InputError as error:
        assert when is not False, f"the step refused valid input: {error}"
        assert blaming in f"{error.source}: {error.field}", f"the stop blames another step: {error}"
        raise
    assert when is not True, "the step went through input it must refuse"


def assert_one_line_input_error(error: InputError):
    message = str(error)
    assert error.source and error.field and error.fix, message
    assert message == f"{error.source}: {error.field}: {error.problem}; fix: {error.fix}"
    assert len(message.splitlines()) == 1, message


def load_slice_covariates(path: Path, case: dict, config: dict, expected):
    """The package calls of the load, slice and covariates rules, with the selection file in between; each
    stops only where the case gives it a reason to."""
    load = dict(config["load"])
    duplicate_names = load.pop("duplicate_names")
    with stops_only(load_must_stop(case, expected, duplicate_names)):
        adata, _ = read_counts_with_renames(path, duplicate_names=duplicate_names)
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.has_canonical_format
    assert adata.X.dtype.kind == "i"
    assert adata.X.nnz == 0 or adata.X.data.min() > 0
    assert np.array_equal(adata.X.toarray().astype(object), expected), "the loaded counts are not the file's"
    # Dropping all-zero cells or genes empties the matrix only when every count is zero.
    with stops_only(adata.X.nnz == 0 and "drop" in (load["zero_cells"], load["zero_genes"])):
        validated = apply_qc_actions(adata, **load)
    adata = validated  # the slice rule reads the input again as load did
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()  # as the slice rule records it
    with stops_only(False if slice_cannot_stop(config["slice"]) else None, blaming="slice."):
        sliced = slice_counts(adata, **config["slice"])
    write_selection(sliced, path.parent / "selection.h5ad")
    adata = read_selected_counts(path, path.parent / "selection.h5ad", duplicate_names=duplicate_names)
    assert adata.X.dtype == sliced.X.dtype and (adata.X != sliced.X).nnz == 0, "the selection reads other counts"
    with stops_only(False if offsets_cannot_stop(config["covariates"]) else None, blaming="covariates"):
        cells, genes = covariate_tables(adata, config["covariates"])
    return adata, cells, genes


# How many examples, and the seed: the Hypothesis profile of tests/conftest.py.
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=h5ad_files(), config=workflow_settings())
# Cases this test has found, run first whatever the generator draws: repeated entries whose sum
# is exactly the 64-bit limit (float64 would round it over) or just past it,
# exceeds the stored type, a float count of 2**63, and a cell named like a missing value.
@example(case=plain_file([(0, 0, 255), (0, 0, 1), (1, 1, 3)], dtype="uint8"), config=PLAIN_SETTINGS)
@example(case=plain_file([(1, 0, 0), (1, 0, 2**63 - 1)], dtype="int64"), config=PLAIN_SETTINGS)
@example(case=plain_file([(1, 0, 1), (1, 0, 2**63 - 1)], dtype="int64"), config=PLAIN_SETTINGS)
@example(case=plain_file([(0, 0, 2.0**63), (1, 1, 3.0)], dtype="float64"), config=PLAIN_SETTINGS)
@example(case=plain_file([(0, 0, 2), (1, 1, 3)], obs_names=("NA", "c1")), config=PLAIN_SETTINGS)
def test_any_small_file_and_valid_settings_fit_or_stop_with_one_input_error_line(case, config):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "counts.h5ad"
        expected = expected_counts(case, write_h5ad(case, path))
        try:
            adata, cells, genes = load_slice_covariates(path, case, config, expected)
        except InputError as error:
            note(f"InputError: {error}")
            event(f"InputError in {error.field}")
            assert_one_line_input_error(error)
            return
        assert np.isfinite(cells["log_offset"]).all() and np.isfinite(genes["log_offset"]).all()
        # The tables go through their files as from the covariates rule to the fit rule; nothing in
        # them is the user's to fix, so this must not fail.
        write_covariates(cells, genes, Path(directory) / "cells.tsv", Path(directory) / "genes.tsv")
        cells, genes = aligned_covariates(Path(directory) / "cells.tsv", Path(directory) / "genes.tsv", adata)
        model = config["model"]
        _, result = fit(adata.X, cells["log_offset"].to_numpy(), genes["log_offset"].to_numpy(),
                        dataclasses.replace(FIT, minibatch=model["minibatch"]), backend="jax",
                        gene_dispersion=model["gene_dispersion"], cell_names=adata.obs_names,
                        gene_names=adata.var_names)
        assert result.steps > 0 and np.isfinite(result.losses).all()
        event("fitted")
