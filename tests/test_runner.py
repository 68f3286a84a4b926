"""The rule scripts' runner: errors a user can act on as one line, anything else with its traceback."""

import errno
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from scnbvi.errors import InputError
from scnbvi.outputs import atomic_output

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"


@pytest.fixture
def runner(monkeypatch):
    """workflow/scripts/_runner.py, with the stderr, logging, sys.path and environment it changes restored."""
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS"):
        # setenv records the variable's state (even its absence), so the runner's settings never
        # outlive the test (a leaked OMP_NUM_THREADS=1 makes `nproc` report one CPU).
        monkeypatch.setenv(variable, os.environ.get(variable, ""))
        if not os.environ[variable]:
            monkeypatch.delenv(variable)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    spec = importlib.util.spec_from_file_location("_runner", SCRIPTS / "_runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        if handler not in handlers:
            handler.stream.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def fake_snakemake(log_path):
    return SimpleNamespace(scriptdir=str(SCRIPTS), threads=1, log=[str(log_path)], rule="fit")


def test_error_a_user_can_act_on_is_one_line_in_log_and_terminal(runner, tmp_path, capsys):
    log_path = tmp_path / "fit.log"

    def main(snakemake):
        raise InputError("config", "inference.batch_size", "0 is not positive", "give a number >= 1")

    with pytest.raises(SystemExit) as exit_info:
        runner.run(fake_snakemake(log_path), main)

    assert exit_info.value.code == 1
    expected = "scnbvi error in rule fit: config: inference.batch_size: 0 is not positive; fix: give a number >= 1"
    assert log_path.read_text().splitlines() == [expected]
    assert expected in capsys.readouterr().err


def test_unexpected_error_keeps_its_traceback_in_the_log(runner, tmp_path):
    log_path = tmp_path / "fit.log"

    def main(snakemake):
        raise RuntimeError("xla boom")

    with pytest.raises(SystemExit) as exit_info:
        runner.run(fake_snakemake(log_path), main)

    assert exit_info.value.code == 1
    log = log_path.read_text()
    assert "Traceback" in log and "RuntimeError: xla boom" in log
    assert "scnbvi error" not in log


def test_full_disk_while_writing_a_result_is_one_line(runner, tmp_path, capsys):
    log_path = tmp_path / "fit.log"
    trace = tmp_path / "results" / "x" / "trace.nc"

    def main(snakemake):
        with atomic_output(trace):
            raise OSError(errno.ENOSPC, "Unable to synchronously create file (errno = 28, "
                                        "error message = 'No space left on device')")

    with pytest.raises(SystemExit) as exit_info:
        runner.run(fake_snakemake(log_path), main)

    assert exit_info.value.code == 1
    [line] = log_path.read_text().splitlines()
    assert line.startswith(f"scnbvi error in rule fit: no space left on device writing {trace}; free about 0.1 GB (")
    assert line in capsys.readouterr().err
    assert list(trace.parent.iterdir()) == []
