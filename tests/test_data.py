"""Tests for reading, checking, cleaning and slicing count matrices."""

import shutil
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from conftest import write_zarr
from scnbvi import data
from scnbvi.data import (SelectedCounts, checked_count_blocks, read_counts, read_counts_with_renames,
                         read_selected_counts, validate_counts, write_counts, write_selection)
from scnbvi.errors import InputError
from scnbvi.qc import apply_qc_actions, gene_counts, qc_report, slice_counts

SEED_DEMO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seed_demo_1000x500.h5ad"
N_VARIABLE_GENES = 5


def simulated_counts(n_cells=60, n_genes=80, seed=0) -> ad.AnnData:
    """Poisson counts, except the first genes: strongly overdispersed at a typical mean (clearly highly variable)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.uniform(0.2, 5.0, n_genes), size=(n_cells, n_genes))
    gamma_shape, mean = 0.2, 3.0
    overdispersed_means = rng.gamma(gamma_shape, mean / gamma_shape, size=(n_cells, N_VARIABLE_GENES))
    counts[:, :N_VARIABLE_GENES] = rng.poisson(overdispersed_means)
    obs = pd.DataFrame({"batch": np.resize(["A", "B", "C"], n_cells)},
                       index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.int32)), obs=obs, var=var)


def hand_built_counts() -> ad.AnnData:
    """Two all-zero cells, three repeated cells (c2, c4, c5) and one all-zero gene (g3)."""
    counts = np.array([
        [1, 0, 2, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 0, 2, 0, 0],
        [0, 3, 0, 0, 1],
        [0, 0, 0, 0, 0],
        [1, 0, 2, 0, 0],
    ])
    return ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(6)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(5)]),
    )


def with_matrix(matrix) -> ad.AnnData:
    n_cells, n_genes = matrix.shape
    return ad.AnnData(X=matrix, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                      var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


def assert_same_counts(left: ad.AnnData, right: ad.AnnData):
    assert list(left.obs_names) == list(right.obs_names)
    assert list(left.var_names) == list(right.var_names)
    np.testing.assert_array_equal(left.X.toarray(), right.X.toarray())


@pytest.mark.parametrize("in_blocks", [False, True], ids=["at-once", "in-small-blocks"])
@pytest.mark.parametrize("as_stored", [sp.csr_matrix, sp.csc_matrix, lambda m: m.toarray(),
                                       lambda m: m.astype(np.float64), lambda m: m.toarray().astype(np.float32)],
                         ids=["csr", "csc", "dense", "csr-float64", "dense-float32"])
def test_read_counts_gives_int32_csr_for_any_layout(tmp_path, as_stored, in_blocks):
    """X is read a block of cells at a time; the result must not depend on the blocks."""
    original = simulated_counts()
    stored = original.copy()
    stored.X = as_stored(original.X)
    stored.write_h5ad(tmp_path / "counts.h5ad")

    counts = read_counts(tmp_path / "counts.h5ad", block_entries=3 * original.n_vars if in_blocks else 50_000_000)

    assert isinstance(counts.X, sp.csr_matrix)
    assert counts.X.dtype == np.int32
    assert_same_counts(counts, original)
    assert list(counts.obs["batch"]) == list(original.obs["batch"])


def test_read_counts_accepts_floats_holding_integers(tmp_path):
    original = simulated_counts()
    stored = original.copy()
    stored.X = original.X.astype(np.float64)
    stored.write_h5ad(tmp_path / "counts.h5ad")

    counts = read_counts(tmp_path / "counts.h5ad")

    assert counts.X.dtype == np.int32
    assert_same_counts(counts, original)


def test_read_counts_uses_int64_when_counts_exceed_int32(tmp_path):
    with_matrix(sp.csr_matrix(np.array([[3.0, 2.0**33]]))).write_h5ad(tmp_path / "big.h5ad")

    counts = read_counts(tmp_path / "big.h5ad")

    assert counts.X.dtype == np.int64
    assert counts.X[0, 1] == 2**33


@pytest.mark.parametrize("bad_value, problem", [
    (-2.0, "1 negative values"),
    (0.5, "1 non-integer values"),
    (np.nan, "1 non-finite values"),
    (np.inf, "1 non-finite values"),
])
def test_validate_counts_names_first_bad_cell_and_gene(bad_value, problem):
    matrix = np.ones((3, 4))
    matrix[1, 2] = bad_value
    matrix[2, 3] = bad_value

    with pytest.raises(InputError) as error:
        validate_counts(with_matrix(sp.csr_matrix(matrix)), "data.h5ad")

    message = str(error.value)
    assert message.startswith("data.h5ad: X: ")
    assert problem.replace("1 ", "2 ") in message
    assert "cell 'c1', gene 'g2'" in message
    assert "fix: " in message


def test_read_counts_rejects_negative_counts_from_file(tmp_path):
    matrix = np.zeros((2, 8))
    matrix[1, 7] = -2
    with_matrix(sp.csr_matrix(matrix)).write_h5ad(tmp_path / "data.h5ad")

    with pytest.raises(InputError, match=r"X: 1 negative values \(first: cell 'c1', gene 'g7' = -2\)"):
        read_counts(tmp_path / "data.h5ad")


def test_read_counts_reports_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="absent.h5ad: file: file not found; fix: "):
        read_counts(tmp_path / "absent.h5ad")
    (tmp_path / "text.h5ad").write_text("not hdf5")
    with pytest.raises(InputError, match="not a readable .h5ad file"):
        read_counts(tmp_path / "text.h5ad")
    (tmp_path / "folder.h5ad").mkdir()
    with pytest.raises(InputError, match="folder.h5ad: file: is a directory"):
        read_counts(tmp_path / "folder.h5ad")
    with pytest.raises(InputError, match="/dev/zero: file: is not a regular file"):
        read_counts("/dev/zero")


def test_a_missing_or_broken_zarr_store_is_one_line_with_the_fix(tmp_path):
    write_zarr(simulated_counts(), tmp_path / "no_obs.zarr")
    shutil.rmtree(tmp_path / "no_obs.zarr" / "obs")
    (tmp_path / "empty.zarr").mkdir()
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    (tmp_path / "file.zarr").write_text("not a directory")
    problems = {
        "absent.zarr": "file: zarr store not found; fix: check the path, or write the store",
        "empty.zarr": r"file: is a directory, not a zarr store \(GroupNotFoundError: .*\); fix: give an .h5ad file, or",
        "plain.zarr": "file: is a zarr store but not an AnnData one",
        "file.zarr": "file: is a file, not the directory of a zarr store; fix: ",
        "no_obs.zarr": r"obs: not readable \(.*\); fix: write the input again with a current anndata's "
                       "AnnData.write_zarr",
    }
    for name, problem in problems.items():
        with pytest.raises(InputError, match=f"^{tmp_path / name}: {problem}") as raised:
            read_counts(tmp_path / name)
        assert "\n" not in str(raised.value)


def write_h5ad_and_zarr(adata: ad.AnnData, directory: Path, zarr_format: int = 3) -> tuple[Path, Path]:
    """The same AnnData written as input.h5ad and as the zarr store input.zarr."""
    adata.write_h5ad(directory / "input.h5ad")
    write_zarr(adata, directory / "input.zarr", zarr_format)
    return directory / "input.h5ad", directory / "input.zarr"


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("layer", [None, "counts", "raw"])
@pytest.mark.parametrize("as_stored", [sp.csr_matrix, sp.csc_matrix, lambda m: m.toarray().astype(np.float32)],
                         ids=["csr", "csc", "dense-float32"])
def test_an_input_reads_the_same_from_h5ad_and_from_zarr(tmp_path, as_stored, layer, zarr_format):
    counts = simulated_counts()
    stored = counts.copy()
    stored.X = as_stored(counts.X)
    stored.uns["note"] = "kept"
    if layer is not None:  # scanpy's and CELLxGENE's layouts: scaled values in X
        stored.layers["counts"] = stored.X
        stored.raw = stored
        stored.X = counts.X.astype(np.float32) / 3
    h5ad, store = write_h5ad_and_zarr(stored, tmp_path, zarr_format)

    assert_identical(read_counts(store, layer=layer), read_counts(h5ad, layer=layer))
    with (checked_count_blocks(h5ad, 3 * 80, layer=layer) as left,
          checked_count_blocks(store, 3 * 80, layer=layer) as right):
        pd.testing.assert_frame_equal(right.obs, left.obs)
        pd.testing.assert_frame_equal(right.var, left.var)
        assert right.uns == left.uns == {"note": "kept"}
        pairs = list(zip(left.blocks, right.blocks, strict=True))
    assert len(pairs) > 1 and all((a != b).nnz == 0 and a.dtype == b.dtype for a, b in pairs)
    sliced = select_as_the_slice_rule_does(h5ad, tmp_path / "selection.h5ad", load={"layer": layer}, **RANDOM_SLICE)
    read = read_selected_counts(store, tmp_path / "selection.h5ad", layer=layer, block_entries=3 * 80)
    assert_identical(read, sliced)
    rows = []
    for path in (h5ad, store):
        with SelectedCounts(path, tmp_path / "selection.h5ad", layer=layer) as counts:
            rows.append(sp.vstack(list(counts.blocks(3 * 80))))
    assert (rows[0] != rows[1]).nnz == 0


def test_float16_counts_read_as_the_same_integers(tmp_path):
    """float16 holds every integer up to 2,048 exactly, and scipy has no float16 sparse matrix."""
    matrix = np.random.default_rng(0).poisson(3.0, (20, 8))
    ad.AnnData(X=matrix.astype(np.float16)).write_h5ad(tmp_path / "half.h5ad")
    np.testing.assert_array_equal(read_counts(tmp_path / "half.h5ad").X.toarray(), matrix)


def test_qc_report_counts_zero_and_duplicate_cells():
    report = qc_report(hand_built_counts())

    assert report == {"n_cells": 6, "n_genes": 5, "nnz": 8, "all_zero_cells": 2,
                      "all_zero_genes": 1, "duplicate_cells": 3}
    assert all(type(value) is int for value in report.values())


def test_qc_report_ignores_explicitly_stored_zeros():
    adata = hand_built_counts()
    dense = adata.X.toarray()
    rows, columns = np.nonzero(dense)
    rows, columns = np.append(rows, 0), np.append(columns, 4)  # a stored zero in c0, which c2 and c5 repeat
    adata.X = sp.csr_matrix((dense[rows, columns], (rows, columns)), shape=dense.shape)
    assert adata.X.nnz == 9

    report = qc_report(adata)

    assert report["duplicate_cells"] == 3
    assert report["nnz"] == 8


def test_apply_qc_actions_drops_as_asked():
    adata = hand_built_counts()

    cleaned = apply_qc_actions(adata, zero_cells="drop", zero_genes="drop", duplicate_cells="drop")

    assert list(cleaned.obs_names) == ["c0", "c3"]
    assert list(cleaned.var_names) == ["g0", "g1", "g2", "g4"]
    assert isinstance(cleaned.X, sp.csr_matrix)
    assert list(apply_qc_actions(adata, zero_cells="keep", duplicate_cells="drop").obs_names) == ["c0", "c1", "c3"]
    assert list(apply_qc_actions(adata, zero_cells="drop").obs_names) == ["c0", "c2", "c3", "c5"]
    assert adata.shape == (6, 5)


def test_apply_qc_actions_rejects_unknown_action():
    with pytest.raises(InputError) as error:
        apply_qc_actions(hand_built_counts(), zero_genes="remove")
    assert error.value.field == "load.zero_genes"


def test_slice_first_equals_leading_block():
    adata = simulated_counts()

    sliced = slice_counts(adata, cells_method="first", n_cells=10, genes_method="first", n_genes=7)

    assert_same_counts(sliced, adata[:10, :7])
    assert isinstance(sliced.X, sp.csr_matrix)


def test_slice_random_is_seeded_and_keeps_original_order():
    adata = simulated_counts()

    def random_slice(seed):
        return slice_counts(adata, cells_method="random", n_cells=15, genes_method="random", n_genes=9, seed=seed)

    first, again, other = random_slice(1), random_slice(1), random_slice(2)

    assert_same_counts(first, again)
    assert list(first.obs_names) != list(other.obs_names)
    assert list(first.var_names) != list(other.var_names)
    positions = adata.obs_names.get_indexer(first.obs_names)
    assert np.all(np.diff(positions) > 0)
    assert first.shape == (15, 9)


def test_slice_larger_than_available_or_all_keeps_everything():
    adata = simulated_counts()

    assert slice_counts(adata, cells_method="random", n_cells=10_000, genes_method="all").shape == adata.shape
    first_none = slice_counts(adata, cells_method="first", n_cells=None, genes_method="first", n_genes=None)
    assert first_none.shape == adata.shape


def test_slice_hvg_finds_variable_genes_without_touching_input():
    adata = simulated_counts()
    before = adata.copy()

    selected = slice_counts(adata, cells_method="all", genes_method="hvg", n_genes=N_VARIABLE_GENES)

    assert list(selected.var_names) == [f"g{j}" for j in range(N_VARIABLE_GENES)]
    assert list(slice_counts(adata, genes_method="hvg", n_genes=12).var_names) == \
        list(slice_counts(adata, genes_method="hvg", n_genes=12).var_names)
    assert_same_counts(adata, before)
    assert list(adata.var.columns) == [] and "hvg" not in adata.uns


def test_slice_hvg_keeps_original_gene_order():
    selected = slice_counts(simulated_counts(), genes_method="hvg", n_genes=12)

    assert selected.n_vars == 12
    positions = [int(name[1:]) for name in selected.var_names]
    assert positions == sorted(positions)


def test_slice_hvg_on_too_few_varying_genes_stops_before_the_loess_fit():
    with pytest.raises(InputError, match="hvg needs at least 10 genes that vary among the selected cells, found 4"):
        slice_counts(simulated_counts()[:, :4], genes_method="hvg", n_genes=2)


def test_slice_obs_filters_keep_only_allowed_values():
    sliced = slice_counts(simulated_counts(), cells_method="all", obs_filters={"batch": ["A", "C"]})

    assert set(sliced.obs["batch"]) == {"A", "C"}
    assert sliced.n_obs == 40


def test_slice_missing_obs_column_lists_available_columns():
    with pytest.raises(InputError, match=r"obs has no column 'study'.*available: \['batch'\]") as error:
        slice_counts(simulated_counts(), obs_filters={"study": ["x"]})
    assert error.value.field == "slice.obs_filters.study"


def test_slice_errors_name_the_setting_that_emptied_it():
    adata = simulated_counts()
    counts = adata.X.toarray()
    counts[0, :] = 0
    adata.X = sp.csr_matrix(counts)

    with pytest.raises(InputError, match=r"no cell has one of the values \['x'\]") as error:
        slice_counts(adata, obs_filters={"batch": ["x"]})
    assert error.value.field == "slice.obs_filters.batch"
    with pytest.raises(InputError, match="every gene is zero in the selected cells") as error:
        slice_counts(adata, cells_method="first", n_cells=1, drop_zero_genes=True)
    assert error.value.field == "slice.drop_zero_genes"
    with pytest.raises(InputError) as error:
        slice_counts(adata, cells_method="first", n_cells=1, drop_zero_cells=True, source="config.slice")
    assert error.value.field == "config.slice.drop_zero_cells"


def test_slice_rejects_unknown_method_and_bad_size():
    with pytest.raises(InputError) as error:
        slice_counts(simulated_counts(), cells_method="last")
    assert error.value.field == "slice.cells.method"
    with pytest.raises(InputError) as error:
        slice_counts(simulated_counts(), genes_method="first", n_genes=0)
    assert error.value.field == "slice.genes.n"


@pytest.mark.parametrize(
    ("setting", "field", "fix"),
    [
        ({"n_cells": 100}, "slice.cells.n", "set slice.cells.method to first or random, or remove n"),
        ({"n_genes": 7}, "slice.genes.n", "set slice.genes.method to first, random or hvg, or remove n"),
    ],
)
def test_slice_rejects_a_size_that_method_all_would_ignore(setting, field, fix):
    with pytest.raises(InputError, match=r"n=\d+ is set but method is 'all'") as error:
        slice_counts(simulated_counts(), **setting)
    assert error.value.field == field
    assert error.value.fix == fix


def test_slice_defaults_keep_everything():
    adata = simulated_counts()

    assert_same_counts(slice_counts(adata), adata)


def test_slice_drops_zero_cells_and_genes():
    adata = hand_built_counts()

    sliced = slice_counts(adata, cells_method="all", genes_method="all", drop_zero_cells=True, drop_zero_genes=True)

    assert list(sliced.obs_names) == ["c0", "c2", "c3", "c5"]
    assert list(sliced.var_names) == ["g0", "g1", "g2", "g4"]


def test_write_counts_round_trip_leaves_no_temporary_file(tmp_path):
    original = simulated_counts()
    target = tmp_path / "new" / "dir" / "counts.h5ad"

    write_counts(original, target)
    again = read_counts(target)

    assert_same_counts(again, original)
    assert list(again.obs["batch"]) == list(original.obs["batch"])
    assert [path.name for path in target.parent.iterdir()] == ["counts.h5ad"]


@pytest.mark.shared_data("seed_demo_1000x500.h5ad")
def test_seed_demo_file_reads_as_int32_csr_with_250_empty_genes():
    counts = read_counts(SEED_DEMO)

    assert counts.shape == (1000, 500)
    assert isinstance(counts.X, sp.csr_matrix) and counts.X.dtype == np.int32
    assert qc_report(counts)["all_zero_genes"] == 250


def test_read_counts_in_blocks_names_a_bad_entry_in_a_later_block(tmp_path):
    matrix = np.ones((9, 4))
    matrix[7, 1] = 0.5
    with_matrix(sp.csr_matrix(matrix)).write_h5ad(tmp_path / "data.h5ad")

    with pytest.raises(InputError, match=r"non-integer values \(first: cell 'c7', gene 'g1' = 0.5\)"):
        read_counts(tmp_path / "data.h5ad", block_entries=8)


def named(n_cells, n_genes, cell_names=None, gene_names=None) -> ad.AnnData:
    """Ones, with the given (possibly repeated) cell and gene names."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* names are not unique", category=UserWarning)
        return ad.AnnData(X=sp.csr_matrix(np.ones((n_cells, n_genes))),
                          obs=pd.DataFrame(index=cell_names or [f"c{i}" for i in range(n_cells)]),
                          var=pd.DataFrame(index=gene_names or [f"g{j}" for j in range(n_genes)]))


def test_read_counts_makes_repeated_names_unique_as_anndata_does_and_records_them(tmp_path):
    genes = ["ACTB", "ACTB", "ACTB-1", "MALAT1", "ACTB", "MALAT1"]
    named(3, 6, ["c0", "c0", "c1"], genes).write_h5ad(tmp_path / "dup.h5ad")
    expected = named(3, 6, ["c0", "c0", "c1"], genes)
    expected.obs_names_make_unique()
    with pytest.warns(UserWarning, match="Suffix used"):  # ACTB-1 exists, so the repeats skip it
        expected.var_names_make_unique()

    counts, renamed = read_counts_with_renames(tmp_path / "dup.h5ad")

    assert list(counts.var_names) == list(expected.var_names) == ["ACTB", "ACTB-2", "ACTB-1", "MALAT1", "ACTB-3",
                                                                   "MALAT1-1"]
    assert list(counts.obs_names) == list(expected.obs_names) == ["c0", "c0-1", "c1"]
    assert renamed == {
        "obs": {"count": 1, "names": {"c0": ["c0-1"]}},
        "var": {"count": 3, "names": {"ACTB": ["ACTB-2", "ACTB-3"], "MALAT1": ["MALAT1-1"]}},
    }
    assert list(read_counts(tmp_path / "dup.h5ad").var_names) == list(counts.var_names)


def test_read_counts_without_repeated_names_renames_nothing(tmp_path):
    simulated_counts().write_h5ad(tmp_path / "counts.h5ad")

    _, renamed = read_counts_with_renames(tmp_path / "counts.h5ad", duplicate_names="error")

    assert renamed == {"obs": {"count": 0, "names": {}}, "var": {"count": 0, "names": {}}}


def test_renamed_record_is_capped_but_counts_every_rename(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "RENAMED_RECORD_LIMIT", 2)
    named(1, 6, gene_names=["a", "a", "b", "b", "c", "c"]).write_h5ad(tmp_path / "dup.h5ad")

    _, renamed = read_counts_with_renames(tmp_path / "dup.h5ad")

    assert renamed["var"] == {"count": 3, "names": {"a": ["a-1"], "b": ["b-1"]}}


def test_read_counts_with_duplicate_names_error_stops_with_the_fix(tmp_path):
    named(2, 4, gene_names=["g0", "ACTB", "g2", "ACTB"]).write_h5ad(tmp_path / "dup.h5ad")

    with pytest.raises(InputError) as error:
        read_counts(tmp_path / "dup.h5ad", duplicate_names="error")

    assert error.value.field == "var_names"
    assert str(error.value) == (
        f"{tmp_path / 'dup.h5ad'}: var_names: 1 repeated names (first: 'ACTB', 2 times); "
        "fix: make them unique in the file (adata.var_names_make_unique()) or set load.duplicate_names: make_unique"
    )


def test_read_counts_rejects_unknown_duplicate_names_action(tmp_path):
    with pytest.raises(InputError) as error:
        read_counts(tmp_path / "absent.h5ad", duplicate_names="drop")
    assert error.value.field == "load.duplicate_names"


def write_stored_csr(path, data, indices, indptr, shape):
    """An .h5ad whose CSR X holds exactly these stored entries (repeats included), checked on disk."""
    matrix = sp.csr_matrix((np.asarray(data, dtype=np.float64), indices, indptr), shape=shape)
    assert not matrix.has_canonical_format
    with_matrix(matrix).write_h5ad(path)
    with h5py.File(path, "r") as file:
        np.testing.assert_array_equal(file["X/data"][:], data)
        np.testing.assert_array_equal(file["X/indices"][:], indices)


@pytest.mark.parametrize("block_entries", [50_000_000, 4], ids=["at-once", "in-blocks"])
@pytest.mark.parametrize("stored, problem", [
    ([1.0, -1.0, 3.0], r"1 negative values \(first: cell 'c1', gene 'g2' = -1\)"),
    ([1.0, 0.5, 0.5], r"2 non-integer values \(first: cell 'c1', gene 'g2' = 0.5\)"),
    ([1.0, np.inf, -np.inf], r"2 non-finite values \(NaN or inf\) \(first: cell 'c1', gene 'g2' = inf\)"),
], ids=["negative-plus-positive", "halves", "infinities"])
def test_read_counts_checks_stored_entries_before_summing_repeats(tmp_path, stored, problem, block_entries):
    """Two stored entries at (c1, g2) that would sum to a valid count must not pass."""
    path = tmp_path / "repeats.h5ad"
    write_stored_csr(path, stored, indices=[0, 2, 2], indptr=[0, 1, 3], shape=(2, 3))

    with pytest.raises(InputError, match=problem):
        read_counts(path, block_entries=block_entries)


def test_read_counts_sums_valid_repeated_entries(tmp_path):
    path = tmp_path / "repeats.h5ad"
    write_stored_csr(path, [1.0, 2.0, 3.0], indices=[0, 2, 2], indptr=[0, 1, 3], shape=(2, 3))

    counts = read_counts(path)

    assert counts.X.has_canonical_format
    np.testing.assert_array_equal(counts.X.toarray(), [[1, 0, 0], [0, 0, 5]])


LOAD_DEFAULTS = {"layer": None, "gene_symbols": None, "duplicate_names": "make_unique", "zero_cells": "drop",
                 "zero_genes": "keep", "duplicate_cells": "keep"}
RANDOM_SLICE = {"cells_method": "random", "n_cells": 40, "genes_method": "random", "n_genes": 30,
                "drop_zero_cells": True, "drop_zero_genes": True, "seed": 5}


def select_as_the_slice_rule_does(path, selection_path, load=None, **slicing) -> ad.AnnData:
    """What the slice rule keeps of the input, in memory (what sliced.h5ad held), its selection written."""
    actions = {**LOAD_DEFAULTS, **(load or {})}
    reading = {key: actions.pop(key) for key in ("duplicate_names", "layer", "gene_symbols")}
    adata = apply_qc_actions(read_counts(path, **reading), **actions)
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
    sliced = slice_counts(adata, **slicing)
    write_selection(sliced, selection_path)
    return sliced


def assert_identical(read: ad.AnnData, expected: ad.AnnData):
    """The same matrix, stored alike, and the same annotations."""
    assert isinstance(read.X, sp.csr_matrix) and read.X.dtype == expected.X.dtype
    for part in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(read.X, part), getattr(expected.X, part))
    pd.testing.assert_frame_equal(read.obs, expected.obs)
    pd.testing.assert_frame_equal(read.var, expected.var)
    assert read.uns.keys() == expected.uns.keys()


@pytest.mark.parametrize("block_entries", [50_000_000, 3 * 80], ids=["at-once", "in-blocks"])
@pytest.mark.parametrize("as_stored", [sp.csr_matrix, sp.csc_matrix, lambda m: m.toarray().astype(np.float32)],
                         ids=["csr", "csc", "dense-float32"])
@pytest.mark.parametrize("slicing", [RANDOM_SLICE, {"genes_method": "hvg", "n_genes": 10,
                                                    "obs_filters": {"batch": ["A", "C"]}},
                                     {"obs_filters": {"group": ["x"]}, "genes_method": "first", "n_genes": 30}],
                         ids=["random", "hvg-filtered", "two-runs-of-cells"])
def test_selected_counts_read_from_the_input_are_those_the_slice_kept(tmp_path, as_stored, block_entries, slicing):
    stored = simulated_counts()
    stored.X = as_stored(stored.X)
    stored.obs["group"] = np.repeat(["x", "y", "x"], 20)  # two runs of 20 kept cells: read as slices
    stored.uns["note"] = "kept"
    stored.write_h5ad(tmp_path / "input.h5ad")
    sliced = select_as_the_slice_rule_does(tmp_path / "input.h5ad", tmp_path / "selection.h5ad", **slicing)

    read = read_selected_counts(tmp_path / "input.h5ad", tmp_path / "selection.h5ad", block_entries=block_entries)

    assert_identical(read, sliced)
    assert read.uns["note"] == "kept"
    selection = ad.read_h5ad(tmp_path / "selection.h5ad")
    assert selection.X is None and not selection.layers and selection.raw is None
    # Some of the selected cells, in another order: those rows only.
    some = list(sliced.obs_names[::-3])
    part = read_selected_counts(tmp_path / "input.h5ad", tmp_path / "selection.h5ad", block_entries=block_entries,
                                cells=some)
    assert_identical(part, sliced[some].copy())


def test_only_selected_cells_can_be_read(tmp_path):
    simulated_counts().write_h5ad(tmp_path / "input.h5ad")
    sliced = select_as_the_slice_rule_does(tmp_path / "input.h5ad", tmp_path / "selection.h5ad", **RANDOM_SLICE)
    unselected = next(name for name in simulated_counts().obs_names if name not in sliced.obs_names)
    with pytest.raises(InputError, match=rf"selection.h5ad: obs_names: 1 of the 2 selected cells are not in the selection .*{unselected}"):
        read_selected_counts(tmp_path / "input.h5ad", tmp_path / "selection.h5ad",
                             cells=[sliced.obs_names[0], unselected])


def test_selected_counts_keep_the_dtype_the_whole_input_needed(tmp_path):
    """One count above int32's range, in a cell the slice leaves out: the kept counts stay int64, as before."""
    matrix = simulated_counts().X.astype(np.int64).tolil()
    matrix[59, 0] = 2**33
    with_matrix(matrix.tocsr()).write_h5ad(tmp_path / "input.h5ad")
    sliced = select_as_the_slice_rule_does(tmp_path / "input.h5ad", tmp_path / "selection.h5ad",
                                           cells_method="first", n_cells=10)

    read = read_selected_counts(tmp_path / "input.h5ad", tmp_path / "selection.h5ad")

    assert sliced.X.dtype == read.X.dtype == np.int64
    assert_identical(read, sliced)


def test_selected_counts_from_a_layer_and_from_raw(tmp_path):
    counts = simulated_counts()
    scanpy_like = counts.copy()
    scanpy_like.layers["counts"] = counts.X.copy()
    scanpy_like.X = counts.X.astype(np.float32) / 3
    scanpy_like.write_h5ad(tmp_path / "layer.h5ad")
    cellxgene_like = counts.copy()
    cellxgene_like.X = counts.X.astype(np.float32)
    cellxgene_like.raw = cellxgene_like
    cellxgene_like = cellxgene_like[:, :50].copy()  # X holds fewer genes than raw
    cellxgene_like.X = cellxgene_like.X / 3
    cellxgene_like.write_h5ad(tmp_path / "raw.h5ad")

    for name, layer in (("layer", "counts"), ("raw", "raw")):
        sliced = select_as_the_slice_rule_does(tmp_path / f"{name}.h5ad", tmp_path / f"{name}_selection.h5ad",
                                               load={"layer": layer}, **RANDOM_SLICE)
        read = read_selected_counts(tmp_path / f"{name}.h5ad", tmp_path / f"{name}_selection.h5ad", layer=layer)

        assert_identical(read, sliced)
        assert read.n_vars == 30 and set(read.var_names) <= set(counts.var_names)


def test_selected_counts_with_repeated_names_renamed_as_load_renamed_them(tmp_path):
    genes = ["ACTB", "ACTB", "ACTB-1", "MALAT1", "ACTB", "MALAT1"]
    adata = named(4, 6, ["c0", "c0", "c1", "c2"], genes)
    adata.X = sp.csr_matrix(np.arange(1, 25).reshape(4, 6))
    adata.write_h5ad(tmp_path / "dup.h5ad")
    sliced = select_as_the_slice_rule_does(tmp_path / "dup.h5ad", tmp_path / "selection.h5ad",
                                           genes_method="random", n_genes=4, seed=1)

    read = read_selected_counts(tmp_path / "dup.h5ad", tmp_path / "selection.h5ad")

    assert_identical(read, sliced)
    assert list(read.obs_names) == ["c0", "c0-1", "c1", "c2"]
    with pytest.raises(InputError, match="obs_names: 1 repeated names"):
        read_selected_counts(tmp_path / "dup.h5ad", tmp_path / "selection.h5ad", duplicate_names="error")


def test_selected_counts_follow_the_names_when_the_input_lists_them_in_another_order(tmp_path):
    simulated_counts().write_h5ad(tmp_path / "input.h5ad")
    sliced = select_as_the_slice_rule_does(tmp_path / "input.h5ad", tmp_path / "selection.h5ad", **RANDOM_SLICE)
    shuffled = ad.read_h5ad(tmp_path / "input.h5ad")
    rng = np.random.default_rng(0)
    shuffled = shuffled[rng.permutation(shuffled.n_obs), rng.permutation(shuffled.n_vars)].copy()
    shuffled.write_h5ad(tmp_path / "input.h5ad")

    assert_identical(read_selected_counts(tmp_path / "input.h5ad", tmp_path / "selection.h5ad", block_entries=200),
                     sliced)


def _more_counts(adata: ad.AnnData) -> ad.AnnData:
    counts = adata.X.tolil()
    counts[0, 0] += 7
    adata.X = counts.tocsr()
    return adata


CHANGES = {
    "a kept cell removed": (lambda adata: adata[1:].copy(), r"obs_names: 1 of the 40 selected cells are not in the "
                            r"input \(first: 'c0'\)"),
    "a kept gene removed": (lambda adata: adata[:, 1:].copy(), r"var_names: 1 of the \d+ selected genes are not in "
                            r"the input \(first: 'g0'\)"),
    "a kept cell's counts changed": (_more_counts, r"X: 1 selected cells have other counts "
                                     r"than when they were selected \(first: 'c0', total \d+, was \d+\)"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_an_input_changed_since_the_selection_is_refused_with_the_fix(tmp_path, change):
    edit, problem = CHANGES[change]
    path = tmp_path / "input.h5ad"
    simulated_counts().write_h5ad(path)
    select_as_the_slice_rule_does(path, tmp_path / "selection.h5ad", cells_method="first", n_cells=40,
                                  genes_method="first", n_genes=60)
    edit(ad.read_h5ad(path)).write_h5ad(path)

    with pytest.raises(InputError, match=f"^{path}: {problem}; fix: the input changed after "
                                         f"{tmp_path / 'selection.h5ad'} was written from it; rerun the workflow "
                                         "with --forcerun load") as raised:
        read_selected_counts(path, tmp_path / "selection.h5ad")
    assert "\n" not in str(raised.value)


def test_gene_counts_are_the_totals_and_expressing_cells_of_each_gene():
    dense = np.array([[0, 3, 1], [2, 0, 0], [5, 7, 0]])
    counts = sp.csr_matrix(dense)
    counts.data[counts.data == 1] = 0  # an explicit zero is stored but expresses nothing
    table = gene_counts(counts, ["a", "b", "c"])
    assert table["total_counts"].tolist() == [7, 10, 0]
    assert table["n_cells_expressed"].tolist() == [2, 2, 0]
    assert table.index.tolist() == ["a", "b", "c"] and table.dtypes.tolist() == [np.int64, np.int64]


def test_duplicate_cells_are_exact_repeats_of_an_earlier_cell():
    rng = np.random.default_rng(3)
    dense = rng.poisson(0.4, (60, 30))
    dense[10] = dense[2]  # repeats
    dense[50] = dense[2]
    dense[11] = dense[3]
    dense[12] = dense[4]
    dense[12, np.flatnonzero(dense[12])[0]] += 1  # one count more: not a repeat
    dense[13] = np.roll(dense[5], 1)  # the same counts on other genes: not a repeat
    dense[20] = dense[21] = 0  # all-zero cells repeat each other
    adata = ad.AnnData(sp.csr_matrix(dense))
    adata.obs_names = [f"c{i}" for i in range(len(dense))]
    seen, repeats = set(), []
    for name, row in zip(adata.obs_names, dense):
        if tuple(row) in seen:
            repeats.append(name)
        seen.add(tuple(row))
    assert {"c10", "c50", "c11", "c21"} <= set(repeats) and not {"c2", "c12", "c13", "c20"} & set(repeats)

    assert qc_report(adata)["duplicate_cells"] == len(repeats)
    kept = apply_qc_actions(adata, zero_cells="keep", duplicate_cells="drop").obs_names
    assert list(kept) == [name for name in adata.obs_names if name not in repeats]


def test_any_rows_of_a_csr_matrix_on_disk_read_as_in_memory(tmp_path):
    """Runs joined into spans across small gaps, then picked: every subset of rows comes back exact."""
    from anndata.io import sparse_dataset

    from scnbvi.data import _read_rows

    rng = np.random.default_rng(0)
    counts = sp.random(500, 30, density=0.2, format="csr", random_state=1, dtype=np.float32)
    ad.AnnData(counts).write_h5ad(tmp_path / "rows.h5ad")
    with h5py.File(tmp_path / "rows.h5ad") as file:
        matrix = sparse_dataset(file["X"])
        for size in [0, 1, 2, 17, 40, 250, 499, 500]:
            rows = np.sort(rng.choice(500, size, replace=False))
            read = _read_rows(matrix, rows)
            assert read.shape == (size, 30) and (read != counts[rows]).nnz == 0
