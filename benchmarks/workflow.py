"""The whole workflow against its fit: wall time, every rule's seconds and peak memory (from
Snakemake's ``benchmark:`` files) and the size of ``results/``, on this machine, in one run.

    python benchmarks/workflow.py --cases seed,20k,atlas --out workflow.md

Each case is ``snakemake --cores 2`` with the default settings on one input, from the
repository root, into ``results/bench_{case}/`` (removed first):

- ``seed``: the notebook's 1,000 x 500 slice, first with empty compile caches (``cold``, as on
  a fresh machine), then again with the caches that run left (``warm``).
- ``20k``: ``../shared/data/microglia_20k.h5ad``, 20,000 real cells x 39,241 genes.
- ``atlas``: those cells stacked, with fresh names, to the atlas's 186,224 cells, written once
  to ``results/benchmark/``; ``atlas-streamed``: the same with ``inference.stream_above_gb: 0``,
  the fit streaming its counts from the file (compare the seconds per epoch).
- ``million`` (opt-in, about 8 GB on disk and a quarter of an hour): those cells stacked to
  1,100,000, written block by block, fitted with the defaults (the counts then do not fit in
  the fit's memory budget and are streamed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CACHE = REPO / "results" / "benchmark"
ATLAS_CELLS = 186_224
MILLION_CELLS = 1_100_000
# Not the workflow's own parts: the stub stands in for a SLURM client without a controller,
# whose probe by Snakemake's SLURM plugin costs 9 s per start on a machine that has one.
LOCAL_BIN = REPO / "tests" / "local_bin"


def stacked_input(n_cells: int, name: str) -> Path:
    """The 20k real cells stacked to ``n_cells`` (fresh cell names), written once, a copy of the 20k
    cells at a time, so that building it never holds more than them."""
    path = CACHE / f"{name}_{n_cells}.h5ad"
    if not path.exists():
        import anndata as ad
        import h5py
        import scipy.sparse as sp
        from anndata.io import sparse_dataset, write_elem

        cells = ad.read_h5ad(DATA / "microglia_20k.h5ad")
        counts = sp.csr_matrix(cells.X)
        temporary = path.with_suffix(".tmp.h5ad")
        CACHE.mkdir(parents=True, exist_ok=True)
        ad.AnnData(counts[: min(n_cells, cells.n_obs)], var=cells.var.copy()).write_h5ad(temporary)
        with h5py.File(temporary, "r+") as file:
            matrix = sparse_dataset(file["X"])
            for start in range(cells.n_obs, n_cells, cells.n_obs):
                matrix.append(counts[: min(cells.n_obs, n_cells - start)])
            del file["obs"]
            write_elem(file, "obs", pd.DataFrame(index=[f"cell{i:07d}" for i in range(n_cells)]))
        temporary.rename(path)
    return path


def inputs() -> dict[str, Path]:
    return {"seed": DATA / "seed_demo_1000x500.h5ad", "20k": DATA / "microglia_20k.h5ad"}


def run_workflow(name: str, data: Path, cache_home: Path, inference: dict | None = None) -> dict:
    """One run of the workflow on ``data`` into results/``name`` (``inference``: settings besides the
    defaults); its measurements."""
    results = REPO / "results" / name
    shutil.rmtree(results, ignore_errors=True)
    config = Path(tempfile.mkdtemp()) / "config.yaml"
    dataset = {"path": os.path.relpath(data, REPO), **({"inference": inference} if inference else {})}
    config.write_text(yaml.safe_dump({"datasets": {name: dataset}}))
    environment = {
        **os.environ,
        "PATH": os.pathsep.join([str(LOCAL_BIN), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "XDG_CACHE_HOME": str(cache_home),  # the JAX compile cache
        "PYTENSOR_FLAGS": f"base_compiledir={cache_home / 'pytensor'}",
    }
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(config)],
                         cwd=REPO, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if run.returncode:
        raise SystemExit(f"the workflow failed on {data}:\n{run.stderr[-3000:]}")
    rules = {path.stem: pd.read_csv(path, sep="\t").iloc[-1] for path in sorted((results / "benchmarks").glob("*.tsv"))}
    stats = json.loads((results / "fit_stats.json").read_text())
    return {
        "wall": wall,
        "rules": {rule: float(row["s"]) for rule, row in rules.items()},
        "peak_rss_mb": {rule: float(row["max_rss"]) for rule, row in rules.items()},
        "fit_seconds": stats["fit_seconds"] + stats["compile_seconds"],
        "seconds_per_epoch": stats["fit_seconds"] / stats["epochs"],
        "epochs": stats["epochs"],
        "converged": stats["converged"],
        "results_mb": disk_mb(results),
    }


def disk_mb(folder: Path) -> float:
    """The bytes under ``folder``, a file hard-linked twice (previous/) counted once."""
    inodes = {}
    for path in folder.rglob("*"):
        if path.is_file():
            status = path.stat()
            inodes[(status.st_dev, status.st_ino)] = status.st_size
    return sum(inodes.values()) / 1e6


def row(case: str, measured: dict) -> list[str]:
    rules = measured["rules"]
    largest_rss = max(measured["peak_rss_mb"].items(), key=lambda item: item[1])
    others = sorted(((rule, seconds) for rule, seconds in rules.items() if rule not in ("fit", "ppc", "summary")),
                    key=lambda item: -item[1])
    return [
        case,
        f"{measured['wall']:.1f}",
        f"{rules['fit']:.1f} ({measured['fit_seconds']:.1f}, {measured['epochs']:.1f} epochs)",
        f"{measured['wall'] / rules['fit']:.2f}",
        f"{measured['seconds_per_epoch']:.3g}",
        f"{rules['ppc']:.1f}",
        f"{rules['summary']:.1f}",
        ", ".join(f"{rule} {seconds:.1f}" for rule, seconds in others),
        f"{largest_rss[1] / 1024:.2f} ({largest_rss[0]})",
        f"{measured['results_mb']:.0f}",
    ]


def table(rows: list[list[str]]) -> str:
    header = ["case", "wall s", "fit rule s (fit and compile, epochs)", "wall / fit rule", "fit s per epoch",
              "ppc s", "summary s",
              "other rules s", "largest peak RSS GB (rule)", "results/ MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="seed,20k")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cases = args.cases.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as cache_home:
        for case in cases:
            if case == "seed":
                data = inputs()[case]
                rows.append(row("seed, cold caches", run_workflow("bench_seed", data, Path(cache_home))))
                rows.append(row("seed, warm caches", run_workflow("bench_seed", data, Path(cache_home))))
            elif case.startswith("atlas"):
                streamed = {"stream_above_gb": 0} if case == "atlas-streamed" else None
                data = stacked_input(ATLAS_CELLS, "atlas")
                rows.append(row(case, run_workflow(f"bench_{case}", data, Path(cache_home), streamed)))
            elif case == "million":
                rows.append(row(case, run_workflow("bench_million", stacked_input(MILLION_CELLS, "million"),
                                                   Path(cache_home))))
            else:
                rows.append(row(case, run_workflow(f"bench_{case}", inputs()[case], Path(cache_home))))
            print(table(rows[-2 if case == "seed" else -1:]), flush=True)
    import psutil

    text = (f"Machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"{platform.processor() or platform.machine()}; command: `python benchmarks/workflow.py --cases "
            f"{args.cases}`\n\n{table(rows)}\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
