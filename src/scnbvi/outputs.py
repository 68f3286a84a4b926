"""Result files written atomically: a reader (or a rerun after a crash) never sees half a file.

Only the standard library is imported here, so that the workflow itself (common.smk) can read
the code version without the scientific stack."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from scnbvi import __version__
from scnbvi.errors import DiskFullError

if TYPE_CHECKING:
    import pandas as pd

PACKAGE_DIR = Path(__file__).resolve().parent
GB = 1e9


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    A full disk (ENOSPC, also when h5py or netCDF wrap it) becomes one ``DiskFullError`` line
    saying how much to free, so it is not lost among HDF5's own error pages.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        yield temporary
        # mkstemp makes the file 0600; a result should be as readable as any file the user makes.
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException as error:
        # Measured before the partial file goes: its size is the best estimate of what is needed.
        disk_full = _disk_full_message(path, temporary) if _is_disk_full(error) else None
        temporary.unlink(missing_ok=True)
        if disk_full:
            raise DiskFullError(disk_full) from error
        raise


def current_umask() -> int:
    """The process's umask, read from /proc where it is there: setting it to read it (the only
    portable way) would briefly change it for every thread."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_json(data: dict, path) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")


def write_table(table: pd.DataFrame, path, **to_csv) -> None:
    """A table as TSV (``sep`` and ``index`` may be overridden, e.g. for CSV)."""
    with atomic_output(path) as temporary:
        table.to_csv(temporary, **{"sep": "\t", **to_csv})


def code_version() -> dict:
    """Which scnbvi code wrote a result, from the package's own files (works from any environment)."""
    return {
        "scnbvi_version": __version__,
        "scnbvi_source_hash": source_hash(),
        "git_commit": git_commit(),
    }


def source_hash(package_dir: Path = PACKAGE_DIR) -> str:
    """Short hash of every file of the package (paths and contents), so any code edit changes it."""
    digest = hashlib.sha256()
    files = sorted(p for p in package_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for file in files:
        content = file.read_bytes()
        digest.update(f"{file.relative_to(package_dir).as_posix()}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:12]


def git_commit(package_dir: Path = PACKAGE_DIR) -> str:
    """HEAD of the checkout holding the package (``-dirty`` with uncommitted changes), else "unknown"."""

    def git(*args):
        return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        # An installed copy inside some other repository must not report that repository's commit.
        tracked = git("ls-files", "--error-unmatch", "__init__.py")
        if head.returncode or tracked.returncode:
            return "unknown"
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if changes.stdout.strip() else "")


def _is_disk_full(error: BaseException) -> bool:
    """Whether ENOSPC caused ``error``: h5py and netCDF re-raise it with errno 28 only in the text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
            "No space left on device" in text or "errno = 28" in text
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full_message(path: Path, temporary: Path) -> str:
    """One line: what could not be written, about how much to free, and what is free now."""
    sizes = [candidate.stat().st_size for candidate in (temporary, path) if candidate.is_file()]
    needed = max([0.1 * GB, *sizes])  # the partial file, or the previous version of the result
    free = shutil.disk_usage(path.parent).free
    return (f"no space left on device writing {path}; free about {needed / GB:.1f} GB "
            f"({free / GB:.1f} GB free there now) and rerun")
