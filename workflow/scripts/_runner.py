"""What every rule script shares: the package on the path, stderr to the rule's log, and errors a
user can act on reported as one line; anything else keeps its traceback in the log."""

import logging
import os
import sys
from pathlib import Path


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
    logging.basicConfig(stream=log_file, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
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
