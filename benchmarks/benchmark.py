"""Benchmark of scnbvi against the original notebook's settings, and of its scaling.

Every case runs in its own process (clean peak RSS, no shared caches beyond PyTensor's on-disk
cache), on this machine, in one run. Usage, from the repository root:

    python benchmarks/benchmark.py --parts 1,2,3,4 --out benchmark.md

Part 1: seed demo slice, original settings vs scnbvi defaults, against a long full-batch
reference fit (full-data ELBO gap, alpha, agreement of gene and cell effects).
Part 2: engines and backends on the seed demo: ms per step and time to convergence.
Part 3: scaling with cells (5k, 20k, 80k) and genes (500 and 3,000 HVGs, all 39,241).
Part 4: the full 186,224 x 39,241 size (the 20k real cells stacked).
Part 5: a fresh machine: every backend on the seed demo with empty compile caches, wall time
from the call of ``fit`` to the fitted result (compilation included), against ``c``.
Part 6: the 20,000 real cells (3,000 HVGs), scnbvi defaults against a long reference (blocks of 1,000)
fit (full-data ELBO gap), as part 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DATA = REPO.parent / "shared" / "data"
SEED_DEMO = DATA / "seed_demo_1000x500.h5ad"
MICROGLIA = DATA / "microglia_20k.h5ad"
CACHE = REPO / "results" / "benchmark"

# The original notebook's settings: the preset the tests and CI use too.
PRESET = REPO / ".test" / "config" / "original_notebook.yaml"
ORIGINAL = yaml.safe_load(PRESET.read_text())["datasets"]["demo"]["inference"]
REFERENCE_NAME = "reference (batch 1,000, learning rate 0.01, long)"
REFERENCE = dict(minibatch="cells", batch_size=1000, max_iterations=30_000, learning_rate=0.01,
                 learning_rate_decay=0.5, max_decays=6, convergence="elbo", tolerance=1e-7, check_every=1000,
                 patience=3)


# --------------------------------------------------------------------------- data


def seed_demo():
    from scnbvi.data import read_counts

    return read_counts(SEED_DEMO).X


def microglia(n_genes: int | None):
    """The 20k real cells, cut to the top ``n_genes`` HVGs (None: every gene). Cached under
    ``results/benchmark`` as the counts of all genes (compressed) and each cut's gene indices,
    so a copy of that folder is all another machine needs."""
    import scipy.sparse as sp

    CACHE.mkdir(parents=True, exist_ok=True)
    all_genes = CACHE / "microglia_all_genes.npz"
    if not all_genes.exists():
        from scnbvi.data import read_counts

        sp.save_npz(all_genes, read_counts(MICROGLIA).X.tocsr(), compressed=True)
    counts = sp.load_npz(all_genes).tocsr()
    if not n_genes:
        return counts
    selected = CACHE / f"microglia_hvg{n_genes}.npy"
    if not selected.exists():
        import anndata as ad

        from scnbvi.qc import slice_counts

        adata = ad.AnnData(counts, var={"gene": np.arange(counts.shape[1]).astype(str)})
        adata.var_names = adata.var["gene"]
        np.save(selected, slice_counts(adata, genes_method="hvg", n_genes=n_genes).var_names.astype(int))
    return counts[:, np.load(selected)]


def atlas_like(n_cells: int, n_genes: int | None):
    """The real 20k cells, genes cut to the top HVGs, cells stacked up to ``n_cells``."""
    import scipy.sparse as sp

    counts = microglia(n_genes)
    repeats = -(-n_cells // counts.shape[0])
    return sp.vstack([counts] * repeats, format="csr")[:n_cells]


def case_counts(case: dict):
    """The counts a case fits: the seed demo, or the real cells stacked and cut (``atlas``)."""
    return seed_demo() if case["data"] == "seed_demo" else atlas_like(case["n_cells"], case["n_genes"])


def offsets(counts):
    """As the workflow's defaults: median total counts as the scalar depth, imputed lengths."""
    from scnbvi.offsets import impute_gene_lengths, log_offsets

    depth = np.asarray(counts.sum(axis=1)).ravel().astype(float)
    depth[depth <= 0] = np.median(depth)
    return log_offsets(depth, impute_gene_lengths(counts.shape[1], seed=0), per_cell=False)


# --------------------------------------------------------------------------- one case


def run_case(case: dict) -> dict:
    """Fit one configuration and report timings, steps, memory and (optionally) quality."""
    from scnbvi.inference import InferenceSettings, fit, full_data_elbo
    from scnbvi.posterior import point_estimate

    counts = case_counts(case)
    cell_offset, gene_offset = offsets(counts)
    settings = InferenceSettings(**{**case.get("settings", {}), "log_every_seconds": 60.0})
    start = time.perf_counter()
    model, result = fit(counts, cell_offset, gene_offset, settings, backend=case["backend"])
    wall = time.perf_counter() - start
    estimate = point_estimate(model, result)
    out = {
        "steps": result.steps,
        "epochs": result.epochs,
        "converged": result.converged,
        "fit_seconds": result.fit_seconds,
        "compile_seconds": result.compile_seconds,
        "wall_seconds": wall,
        "ms_per_step": 1000 * result.fit_seconds / max(result.steps, 1),
        "seconds_per_epoch": result.fit_seconds / max(result.epochs, 1e-9),
        "alpha": float(estimate["alpha"].mean()),
        "shape": list(counts.shape),
    }
    if case.get("quality"):
        out["full_data_elbo"] = full_data_elbo(counts, cell_offset, gene_offset, result)
        np.savez(case["quality"], gene=estimate["gene_effect"], cell=estimate["cell_effect"], alpha=estimate["alpha"])
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if case["backend"] == "jax":
        import jax

        device = jax.devices()[0]
        out["device"] = f"{device.platform} ({device.device_kind}, {len(jax.devices())} device(s))"
    return out


def spawn(case: dict, timeout: float, env: dict | None = None, cores: int | None = None) -> dict:
    """Run a case in a fresh process (``env`` added to its environment; on the first ``cores``
    CPU cores only, if given); a case that fails or times out is reported, not fatal."""
    command = [sys.executable, "-W", "ignore", __file__, "--case", json.dumps(case)]
    if cores:
        command = ["taskset", "--cpu-list", f"0-{cores - 1}", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "failed")}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"case": case, "result": result}), file=sys.stderr, flush=True)
    return result


# --------------------------------------------------------------------------- parts


def scnbvi_defaults() -> dict:
    from scnbvi.inference import InferenceSettings

    return {k: v for k, v in asdict(InferenceSettings()).items() if k not in ("log_every_seconds", "memory_limit_gb")}


def against_reference(data: dict, cases: dict, timeout: float, label: str) -> str:
    """Each case's fit on ``data`` against a long reference fit (``REFERENCE``) of the same data:
    full-data ELBO gap (same fixed draws for every fit), alpha, agreement of the effects."""
    results = {}
    for name, case in {REFERENCE_NAME: dict(backend="jax", settings=REFERENCE), **cases}.items():
        npz = CACHE / f"reference_{len(results)}.npz"
        results[name] = spawn({**case, **data, "quality": str(npz)}, timeout)
        results[name]["npz"] = npz
    reference = results[REFERENCE_NAME]
    ref_effects = np.load(reference["npz"]) if "error" not in reference else None
    counts = case_counts(data)
    # Effects of genes and cells without any count are bounded only from above: compare the rest.
    expressed = {"gene": np.asarray(counts.sum(axis=0)).ravel() > 0, "cell": np.asarray(counts.sum(axis=1)).ravel() > 0}
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, r["error"]] + [""] * 7)
            continue
        gap = (reference["full_data_elbo"] - r["full_data_elbo"]) / abs(reference["full_data_elbo"])
        e = np.load(r["npz"])
        agreement = []
        for kind in ("gene", "cell"):
            mine, ref = e[kind][expressed[kind]], ref_effects[kind][expressed[kind]]
            mine, ref = mine - mine.mean(), ref - ref.mean()
            agreement.append(f"{np.corrcoef(mine, ref)[0, 1]:.4f} / {np.max(np.abs(mine - ref)):.3f}")
        rows.append([name, f"{r['fit_seconds']:.1f}", f"{r['compile_seconds']:.1f}", f"{r['steps']:,}",
                     "yes" if r["converged"] else "no", f"{100 * gap:.3f} %", f"{r['alpha']:.4f}", *agreement])
    header = [label, "fit s (warm)", "compile s", "steps", "converged", "ELBO gap to reference", "alpha",
              f"gene effects r / max abs diff ({expressed['gene'].sum():,} expressed genes)",
              "cell effects r / max abs diff (cells with counts)"]
    return table(header, rows)


def part1(timeout):
    cases = {
        "original settings (entries, pymc/c)": dict(backend="c", settings=ORIGINAL),
        "scnbvi defaults, jax": dict(backend="jax", settings=scnbvi_defaults()),
        "scnbvi defaults, pymc/c": dict(backend="c", settings=scnbvi_defaults()),
    }
    return against_reference({"data": "seed_demo"}, cases, timeout, "seed demo 1,000 x 500")


def part6(timeout):
    """The default fit's full-data ELBO on the 20,000 real cells (3,000 HVGs) against a long
    reference fit (blocks of 1,000 cells)."""
    data = {"data": "atlas", "n_cells": 20_000, "n_genes": 3000}
    cases = {"scnbvi defaults, jax": dict(backend="jax", settings=scnbvi_defaults())}
    return against_reference(data, cases, timeout, "20,000 real cells x 3,000 HVGs")


def part2(timeout):
    """Both layouts on every backend: ``cells`` (scnbvi's defaults) to convergence, ``entries``
    (the original's settings) for a fixed number of steps, as it does not converge."""
    rows = []
    for layout in ("cells", "entries"):
        for backend in ("jax", "c", "numba", "py"):
            settings = scnbvi_defaults() if layout == "cells" else {**ORIGINAL, "max_iterations": 5000}
            if backend == "py":  # ~10-100 ms/step: time a fixed number of steps
                settings = {**settings, "max_iterations": 300, "convergence": "parameters", "tolerance": 1e-12}
            r = spawn({"data": "seed_demo", "backend": backend, "settings": settings}, timeout)
            name = f"{layout}: " + ("jax" if backend == "jax" else f"pymc / {backend}")
            if "error" in r:
                rows.append([name, r["error"], "", "", ""])
                continue
            if r["converged"]:
                to_converge = f"{r['fit_seconds']:.1f} s ({r['steps']:,} steps)"
            else:
                to_converge = f"not converged in {r['steps']:,} steps (timing run)"
            rows.append([name, f"{r['ms_per_step']:.2f}", f"{r['compile_seconds']:.1f}", to_converge, f"{r['peak_rss_gb']:.2f}"])
    header = ["layout: engine / backend (seed demo, batch 128)", "ms per step", "compile s", "time to convergence", "peak RSS GB"]
    return table(header, rows)


def scaling_rows(sizes, backend, timeout, settings=None):
    rows = []
    engine = "jax" if backend == "jax" else f"pymc / {backend}"
    for n_cells, n_genes in sizes:
        r = spawn({"data": "atlas", "n_cells": n_cells, "n_genes": n_genes, "backend": backend,
                   "settings": settings or scnbvi_defaults()}, timeout)
        label = f"{n_cells:,} x {n_genes or 39241:,}"
        if "error" in r:
            rows.append([label, engine, r["error"]] + [""] * 7)
            continue
        rows.append([label, engine, f"{r['ms_per_step']:.1f}", f"{r['seconds_per_epoch']:.1f}", f"{r['steps']:,}",
                     f"{r['epochs']:.2f}", "yes" if r["converged"] else "no (timing run)",
                     f"{r['fit_seconds'] / 60:.2f}", f"{r['wall_seconds'] / 60:.2f}", f"{r['peak_rss_gb']:.2f}"])
    return rows


SCALING_HEADER = ["cells x genes", "engine", "ms per step", "s per epoch", "steps", "epochs", "converged",
                  "fit min", "wall min (incl. reading, compile)", "peak RSS GB"]


def part3(timeout):
    sizes = [(n, g) for g in (500, 3000, None) for n in (5_000, 20_000, 80_000)]
    return table(SCALING_HEADER, scaling_rows(sizes, "jax", timeout))


def part4(timeout):
    """Converged fits with the ``jax`` engine; the ``pymc`` engine timed on 300 steps, as each
    of its steps updates every cell's parameters and it needs many epochs."""
    sizes = [(186_224, 3000), (186_224, None)]
    timing = {**scnbvi_defaults(), "max_iterations": 300, "convergence": "parameters", "tolerance": 1e-12}
    rows = scaling_rows(sizes, "jax", timeout) + scaling_rows(sizes, "c", timeout, settings=timing)
    return table(SCALING_HEADER, rows)


def part5(timeout):
    """Each backend as a first run on a fresh machine sees it: PyTensor's, Numba's and JAX's
    on-disk compile caches empty."""
    import tempfile

    rows, walls = [], {}
    for backend in ("c", "jax", "numba", "py"):
        settings = scnbvi_defaults()
        if backend == "py":  # ~10-100 ms/step: a fixed number of steps, reported as such
            settings = {**settings, "max_iterations": 300, "convergence": "parameters", "tolerance": 1e-12}
        with tempfile.TemporaryDirectory() as empty:
            env = {"PYTENSOR_FLAGS": f"compiledir={empty}/pytensor", "NUMBA_CACHE_DIR": f"{empty}/numba",
                   "JAX_COMPILATION_CACHE_DIR": f"{empty}/jax"}
            r = spawn({"data": "seed_demo", "backend": backend, "settings": settings}, timeout, env)
        if "error" in r:
            rows.append([backend, r["error"], "", "", "", ""])
            continue
        walls[backend] = r["wall_seconds"]
        steps = f"{r['steps']:,}" + ("" if r["converged"] else " (not converged)")
        rows.append([backend, f"{r['wall_seconds']:.1f}", f"{r['compile_seconds']:.1f}", f"{r['fit_seconds']:.1f}",
                     steps, f"{walls['c'] / r['wall_seconds']:.2f}x" if "c" in walls else ""])
    header = ["backend (seed demo, empty caches)", "wall s (fit call)", "compile s", "fit s", "steps", "speed-up over c"]
    return table(header, rows)


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_parts(selected: str, parts: dict, out: Path | None, sections: list[str], label: str = "{}") -> None:
    """Run the comma-separated ``selected`` parts in order, printing each table as it is done
    and writing them all to ``out`` after the ``sections`` already there."""
    for name in selected.split(","):
        started = time.perf_counter()
        text = parts[name]()
        sections.append(f"{label.format(name)} ({time.perf_counter() - started:.0f} s)\n\n{text}")
        print(sections[-1], flush=True)
    if out:
        out.write_text("\n\n".join(sections) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="1,2,3,4")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    import platform

    import psutil

    sections = [f"Machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                f"{platform.processor() or platform.machine()}; command: `python benchmarks/benchmark.py --parts {args.parts}`"]
    parts = {"1": part1, "2": part2, "3": part3, "4": part4, "5": part5, "6": part6}
    parts = {name: partial(part, args.timeout) for name, part in parts.items()}
    run_parts(args.parts, parts, args.out, sections, label="Part {}")


if __name__ == "__main__":
    main()
