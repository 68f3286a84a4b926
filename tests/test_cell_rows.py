"""The fit's counts held in memory or streamed from the input: the same rows, statistics and fit."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from conftest import write_zarr
from scnbvi import batches
from scnbvi.batches import BatchSampler, epoch_windows
from scnbvi.cell_rows import InMemoryRows, StreamedRows, fit_statistics, selected_counts, weighted_sums
from scnbvi.data import SelectedCounts, read_selected_counts, write_selection
from scnbvi.inference import InferenceSettings, fit
from scnbvi.qc import gene_counts
from scnbvi.simulate import SimulationTruth, simulate_counts

TRUTH = SimulationTruth(mu_gene=0.0, sigma_gene=1.5, sigma_cond=0.3, alpha=2.0)


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of 4 chunks of 16 cells: the few hundred cells below span several."""
    monkeypatch.setattr(batches, "SHUFFLE_CHUNK_CELLS", 16)
    monkeypatch.setattr(batches, "SHUFFLE_WINDOW_CHUNKS", 4)


@pytest.fixture
def input_and_selection(tmp_path):
    """An input of 330 simulated cells stored as float32, and a selection dropping some of its cells and genes."""
    adata = simulate_counts(n_cells=330, n_genes=40, seed=5, truth=TRUTH)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.write_h5ad(tmp_path / "input.h5ad")
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(np.int64)
    kept = adata[np.arange(330) % 7 != 3, np.arange(40) % 5 != 1].copy()
    kept.X = kept.X.astype(np.int32)
    for column, values in gene_counts(kept.X, kept.var_names).items():
        kept.var[column] = values.to_numpy()
    write_selection(kept, tmp_path / "selection.h5ad")
    return tmp_path / "input.h5ad", tmp_path / "selection.h5ad"


def test_statistics_of_blocks_equal_those_of_the_whole_matrix():
    counts = sp.random(57, 13, density=0.3, format="csr", random_state=np.random.default_rng(2), dtype=np.float64)
    counts.data = np.ceil(counts.data * 9)
    whole = fit_statistics([counts], 13)
    blocks = fit_statistics([counts[start:start + 10] for start in range(0, 57, 10)], 13)
    for name in ("cell_totals", "cell_nnz", "gene_totals"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name))
    np.testing.assert_array_equal(blocks.cell_half_totals, whole.cell_half_totals)
    np.testing.assert_array_equal(whole.cell_half_totals[0], np.asarray(counts[:, 0::2].sum(axis=1)).ravel())
    np.testing.assert_array_equal(whole.gene_totals, np.asarray(counts.sum(axis=0)).ravel())
    assert blocks.digest == whole.digest and whole.valid and whole.nnz == counts.nnz
    changed = counts.copy()
    changed.data[0] += 1
    assert fit_statistics([changed], 13).digest != whole.digest
    changed.data[0] = -1
    assert not fit_statistics([changed], 13).valid


def test_an_epoch_reads_every_cell_once_in_windows_of_whole_chunks(small_windows):
    windows = epoch_windows(np.random.default_rng(0), 330)
    np.testing.assert_array_equal(np.sort(np.concatenate(windows)), np.arange(330))
    chunks = [np.unique(window // 16) for window in windows]
    assert [len(chunk) for chunk in chunks] == [4, 4, 4, 4, 4, 1]  # 21 chunks, the last of 10 cells
    for window, chunk in zip(windows, chunks):
        assert len(window) == sum(min(16, 330 - 16 * c) for c in chunk)  # whole chunks
    assert any(np.any(np.diff(chunk) > 1) for chunk in chunks)  # chunks from across the data set
    # A data set of one window is shuffled as one permutation of its cells.
    np.testing.assert_array_equal(epoch_windows(np.random.default_rng(0), 60)[0],
                                  np.random.default_rng(0).permutation(60))


def test_streamed_rows_are_the_rows_read_into_memory(input_and_selection, small_windows):
    held = InMemoryRows(read_selected_counts(*input_and_selection).X)
    with SelectedCounts(*input_and_selection) as reader:
        streamed = StreamedRows(reader, block_entries=200)
        assert streamed.statistics().digest == held.statistics().digest
        np.testing.assert_array_equal(streamed.statistics().cell_totals, held.statistics().cell_totals)
        np.testing.assert_array_equal(streamed.cell_nnz, held.cell_nnz)
        cells = np.array([5, 280, 3, 64, 64, 100])
        rows = streamed.rows(cells)  # not admitted: read on their own
        assert (rows != held.rows(cells)).nnz == 0 and rows.dtype == held.counts.dtype
        streamed.admit(np.arange(100, 180), keep=np.array([3, 5]))
        assert np.count_nonzero(streamed._slot >= 0) == 82
        rows = streamed.rows(np.array([179, 3, 100]))
        np.testing.assert_array_equal(rows.indices, held.rows(np.array([179, 3, 100])).indices)
        sampled = [BatchSampler(store, "cells", 24, seed=3).next_stack(30)[0] for store in (held, streamed)]
        for name in sampled[0]:
            np.testing.assert_array_equal(sampled[0][name], sampled[1][name])


@pytest.mark.fit
def test_a_streamed_fit_is_the_fit_in_memory(input_and_selection, small_windows):
    """Several windows an epoch, checks and the closing sweep: the same numbers to the last bit."""
    settings = InferenceSettings(max_iterations=600, check_every=100, batch_size=32, draws=50, log_every_seconds=1e9)
    fits = []
    for stream_above_gb in (4.0, 0.0):
        with selected_counts(*input_and_selection, stream_above_gb, block_entries=300) as (selection, counts):
            assert isinstance(counts, StreamedRows) == (stream_above_gb == 0)
            offsets = np.zeros(selection.n_obs), np.zeros(selection.n_vars)
            fits.append(fit(counts, *offsets, settings, backend="jax")[1])
    in_memory, streamed = fits
    np.testing.assert_array_equal(streamed.losses, in_memory.losses)
    assert streamed.checks == in_memory.checks
    for name in in_memory.means:
        np.testing.assert_array_equal(streamed.means[name], in_memory.means[name])
        np.testing.assert_array_equal(streamed.stds[name], in_memory.stds[name])


def test_a_zarr_input_streams_the_counts_of_the_same_h5ad_input(input_and_selection, small_windows):
    h5ad, selection = input_and_selection
    store = h5ad.with_suffix(".zarr")
    write_zarr(ad.read_h5ad(h5ad), store)
    with SelectedCounts(h5ad, selection) as from_h5ad, SelectedCounts(store, selection) as from_zarr:
        streamed = [StreamedRows(reader, block_entries=200) for reader in (from_h5ad, from_zarr)]
        assert streamed[1].statistics().digest == streamed[0].statistics().digest
        cells = np.array([5, 280, 3, 64, 100])
        for rows in streamed:
            rows.admit(np.arange(100, 180), keep=np.array([3, 5]))
        assert (streamed[1].rows(cells) != streamed[0].rows(cells)).nnz == 0
    with selected_counts(store, selection, stream_above_gb=0, block_entries=200) as (_, counts):
        assert isinstance(counts, StreamedRows) and counts.statistics().digest == streamed[0].statistics().digest


def test_group_sums_of_streamed_counts_are_those_in_memory(input_and_selection):
    held = read_selected_counts(*input_and_selection).X
    groups = np.random.default_rng(1).random((3, held.shape[0]))
    with SelectedCounts(*input_and_selection) as reader:
        streamed = StreamedRows(reader, block_entries=200)
        assert len(list(streamed.blocks())) > 5
        np.testing.assert_allclose(weighted_sums(streamed, groups), groups @ held.toarray(), rtol=1e-12)
        np.testing.assert_array_equal(weighted_sums(streamed, groups > 0.5, expressed=True),
                                      (groups > 0.5).astype(float) @ (held.toarray() > 0))


def test_an_admitted_window_is_taken_from_the_read_ahead(input_and_selection, monkeypatch):
    held = InMemoryRows(read_selected_counts(*input_and_selection).X)
    with SelectedCounts(*input_and_selection) as reader:
        streamed = StreamedRows(reader, block_entries=200)
        streamed.admit(np.arange(0, 50))
        streamed.prefetch(np.arange(30, 120))  # those held already are not read again
        reads = []
        monkeypatch.setattr(reader, "read", lambda cells: reads.append(cells) or SelectedCounts.read(reader, cells))
        streamed.admit(np.arange(50, 120), keep=np.arange(40, 50))
        assert not reads
        cells = np.arange(40, 120)
        assert (streamed.rows(cells) != held.rows(cells)).nnz == 0
        streamed.prefetch(np.arange(200, 210))
        streamed.admit(np.arange(205, 215))  # not all read ahead: read now
        assert sorted(map(tuple, reads)) == [tuple(range(200, 210)), tuple(range(205, 215))]
        assert (streamed.rows(np.arange(205, 215)) != held.rows(np.arange(205, 215))).nnz == 0


def test_entries_drawn_from_streamed_counts_stop_with_the_fix(input_and_selection):
    from scnbvi.errors import InputError

    with selected_counts(*input_and_selection, 0.0) as (selection, counts):
        with pytest.raises(InputError, match="inference.minibatch: .*needs the counts in memory.*fix: use minibatch: "
                                             "cells, or raise inference.stream_above_gb"):
            fit(counts, np.zeros(selection.n_obs), np.zeros(selection.n_vars), InferenceSettings(minibatch="entries"),
                backend="jax")
