"""Result files written atomically: a reader (or a rerun after a crash) never sees half a file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(temporary_name)
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


def write_json(data: dict, path) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")


def write_table(table: pd.DataFrame, path, **to_csv) -> None:
    """A table as TSV (``sep`` and ``index`` may be overridden, e.g. for CSV)."""
    with atomic_output(path) as temporary:
        table.to_csv(temporary, **{"sep": "\t", **to_csv})
