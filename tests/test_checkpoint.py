"""Checkpoints: a fit stopped by a signal resumes with the numbers of a fit never stopped."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from scnbvi.inference import InferenceSettings, fit
from scnbvi.inference.checkpoint import FitInterrupted, remove_checkpoint
from scnbvi.inference.progress import Progress
from scnbvi.simulate import simulate_counts

pytestmark = pytest.mark.fit

# Checks every step with the jax engine and every 4 with the pymc engine (an epoch: 400 cells in
# blocks of 128), a checkpoint whenever one is due.
SETTINGS = InferenceSettings(max_iterations=200, check_every=1, tolerance=1e-6, draws=10, checkpoint_minutes=0.0,
                             log_every_seconds=1e9)


@pytest.fixture(scope="module")
def data():
    adata = simulate_counts(400, 25, seed=5)
    return adata.X, np.log(adata.obs["depth"].to_numpy() / 1e5), np.zeros(25)


def _fit(data, backend="jax", **kwargs):
    counts, cell_offset, gene_offset = data
    return fit(counts, cell_offset, gene_offset, SETTINGS, backend=backend, **kwargs)[1]


@pytest.mark.parametrize(("backend", "fifth_check"), [("jax", 5), ("c", 20)])  # the jax and the pymc engine
def test_a_fit_stopped_by_sigterm_resumes_to_the_same_numbers(data, tmp_path, monkeypatch, caplog, backend,
                                                              fifth_check):
    clean = _fit(data, backend)
    path = tmp_path / "fit.checkpoint"
    checks_seen = []
    original_check = Progress.check

    def terminate_at_the_fifth_check(self, step, loss, rule):
        original_check(self, step, loss, rule)
        checks_seen.append(step)
        if len(checks_seen) == 5:
            signal.raise_signal(signal.SIGTERM)  # as SLURM does before its time limit

    monkeypatch.setattr(Progress, "check", terminate_at_the_fifth_check)
    with pytest.raises(FitInterrupted, match=rf"stopped by SIGTERM at step {fifth_check}; .*fix: rerun the same command"):
        _fit(data, backend, checkpoint_path=path)
    assert path.is_file()
    monkeypatch.setattr(Progress, "check", original_check)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    with caplog.at_level("INFO", logger="scnbvi"):
        resumed = _fit(data, backend, checkpoint_path=path)
    # It did resume, from where it stopped, rather than happen to start over to the same numbers.
    assert f"resuming from checkpoint {path} at step {fifth_check}" in caplog.text
    # Kept, at the finished fit, until the caller has written the results: were that write to
    # fail, the rerun would start from the end, not redo the fit.
    caplog.clear()
    with caplog.at_level("INFO", logger="scnbvi"):
        again = _fit(data, backend, checkpoint_path=path)
    assert f"resuming from checkpoint {path} at step {clean.steps}" in caplog.text
    np.testing.assert_array_equal(again.means["gene_effect"], clean.means["gene_effect"])
    remove_checkpoint(path)
    assert not path.exists()
    assert resumed.steps == clean.steps and resumed.checks == clean.checks
    np.testing.assert_array_equal(resumed.losses, clean.losses)
    for name in clean.means:
        np.testing.assert_array_equal(resumed.means[name], clean.means[name])
        np.testing.assert_array_equal(resumed.stds[name], clean.stds[name])


def test_a_checkpoint_of_other_data_or_settings_is_never_used(data, tmp_path, monkeypatch):
    path = tmp_path / "fit.checkpoint"
    original_check = Progress.check

    def terminate(self, step, loss, rule):
        original_check(self, step, loss, rule)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(Progress, "check", terminate)
    with pytest.raises(FitInterrupted):
        _fit(data, checkpoint_path=path)
    monkeypatch.setattr(Progress, "check", original_check)
    counts, cell_offset, gene_offset = data
    other = fit(counts, cell_offset + 0.1, gene_offset, SETTINGS, backend="jax", checkpoint_path=path)[1]
    fresh = fit(counts, cell_offset + 0.1, gene_offset, SETTINGS, backend="jax")[1]
    np.testing.assert_array_equal(other.losses, fresh.losses)


def test_a_checkpoint_of_another_version_of_the_code_is_never_used(data, monkeypatch):
    from scnbvi.inference import checkpoint

    counts = data[0]
    from scnbvi.cell_rows import InMemoryRows

    arguments = (InMemoryRows(counts).statistics().digest, {"cell_log_offset": data[1]}, SETTINGS, {"backend": "jax"})
    before = checkpoint.fingerprint(*arguments)
    assert checkpoint.fingerprint(*arguments) == before
    monkeypatch.setattr(checkpoint, "source_hash", lambda: "another-version")
    assert checkpoint.fingerprint(*arguments) != before


@pytest.mark.parametrize("backend", ["jax", "c"])
def test_a_checkpoint_that_cannot_be_written_or_removed_costs_only_a_warning(data, tmp_path, monkeypatch, caplog,
                                                                             backend):
    """A full disk while saving, and results made read-only before the checkpoint is removed: the
    fit ends with the same numbers as without checkpoints, and leaves no temporary file."""
    import errno
    from pathlib import Path

    clean = _fit(data, backend)

    def full_disk(self, content):
        raise OSError(errno.ENOSPC, "No space left on device")

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    monkeypatch.setattr(Path, "unlink", read_only)
    with caplog.at_level("WARNING", logger="scnbvi"):
        result = _fit(data, backend, checkpoint_path=tmp_path / "fit.checkpoint")
        remove_checkpoint(tmp_path / "fit.checkpoint")
    monkeypatch.undo()
    np.testing.assert_array_equal(result.means["gene_effect"], clean.means["gene_effect"])
    assert "checkpoint not saved" in caplog.text and "No space left on device" in caplog.text
    assert "could not remove the finished fit's checkpoint" in caplog.text
    assert list(tmp_path.iterdir()) == []
