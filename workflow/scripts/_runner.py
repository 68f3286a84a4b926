"""What every rule script shares: the package on the path, stderr to the rule's log, and errors a
user can act on reported as one line; anything else keeps its traceback in the log."""

import logging
import os
import sys
from pathlib import Path


def quiet_libraries():
    """Leave out what the user cannot act on: PyTensor's BLAS advice (the model has no large
    matrix products), and libraries' informational lines (arviz's optional packages, JAX's
    search for TPUs, matplotlib's font cache); their warnings and errors stay."""
    import warnings

    warnings.filterwarnings("ignore", message="PyTensor could not link to a BLAS installation")
    logging.getLogger("pytensor.tensor.blas").setLevel(logging.ERROR)
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)


def stage_logger(what: str):
    """A function that logs each finished stage of ``what`` with the seconds since this call: a
    step that runs for minutes says where it is."""
    import time

    log, started = logging.getLogger("scnbvi.progress"), time.perf_counter()

    def stage(done: str) -> None:
        log.info("%s: %s (%.1f s)", what, done, time.perf_counter() - started)

    return stage


def run(snakemake, main):
    """Run ``main(snakemake)`` with stderr and logging sent to ``snakemake.log[0]``."""
    sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))
    threads = str(snakemake.threads)
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = threads
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}")
    terminal = sys.stderr
    log_file = open(snakemake.log[0], "w", buffering=1)
    sys.stderr = log_file
    quiet_libraries()
    logging.basicConfig(stream=log_file, level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    logging.getLogger("scnbvi").setLevel(logging.INFO)
    # A fit's progress is shown on the terminal too, prefixed by its data set.
    to_terminal = logging.StreamHandler(terminal)
    dataset = getattr(getattr(snakemake, "wildcards", None), "dataset", "")
    to_terminal.setFormatter(logging.Formatter(f"[{snakemake.rule} {dataset}] %(message)s"))
    logging.getLogger("scnbvi.progress").addHandler(to_terminal)
    from scnbvi.errors import ScnbviError

    try:
        main(snakemake)
    except ScnbviError as error:
        message = f"scnbvi error in rule {snakemake.rule}: {error}"
        print(message, file=log_file)
        print(message, file=terminal)
        sys.exit(1)
    except Exception:
        # An unexpected error (a bug, or JAX/XLA failing) needs its traceback, written before exiting.
        logging.exception("unexpected error in rule %s", snakemake.rule)
        print(f"scnbvi: unexpected error in rule {snakemake.rule}; traceback in {snakemake.log[0]}", file=terminal)
        sys.exit(1)
