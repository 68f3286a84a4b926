"""The atlas-size fits on one GPU, against the same machine's CPU cores in the same run.

Each case runs in its own process (``benchmark.py``'s ``run_case``), the ``jax`` backend with
the default settings, to convergence (or divergence, reported as the case's error); the data are
the 20,000 real cells stacked to 186,224 (as ``benchmark.py`` part 4), their counts and HVG
selections cached under ``results/benchmark`` on the first run (copy that folder to a machine
without the shared data). Needs the project's environment with a CUDA-enabled jax. From the
repository root:

    python benchmarks/gpu_benchmark.py          # the full table, about 8 minutes on one H100
    python benchmarks/gpu_benchmark.py --cells 5000 --gpu-genes 500 --cpu-genes 500 --few-cores 0   # a quick look

Prints one row per case as it finishes, then the table: per case the device, steps, epochs, fit
and compile seconds, ms per step, peak RSS, and its speed-up: the GPU's over all CPU cores, and
all cores' over ``--few-cores`` cores, on the same data.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmark import spawn, table

ALL_GENES = 39_241


def genes_option(text: str) -> list[int | None]:
    """``3000,all`` -> [3000, None] (None: every gene)."""
    return [None if value == "all" else int(value) for value in text.split(",") if value]


def cases(args) -> list[tuple[str, int | None, int | None]]:
    """(platform, genes, cores) in the order they run: the GPU, all CPU cores, then the few
    cores, whose speed-up is taken against the all-core case of the same genes."""
    listed = [("cuda", genes, None) for genes in genes_option(args.gpu_genes)]
    listed += [("cpu", genes, None) for genes in genes_option(args.cpu_genes)]
    if args.few_cores:
        listed += [("cpu", genes, args.few_cores) for genes in genes_option(args.few_cores_genes)]
    return listed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=186_224)
    parser.add_argument("--gpu-genes", default="3000,all", help="gene counts fitted on the GPU ('all': every gene)")
    parser.add_argument("--cpu-genes", default="3000,all", help="gene counts fitted on all CPU cores")
    parser.add_argument("--few-cores", type=int, default=2, help="CPU cores of the scaling comparison (0: none)")
    parser.add_argument("--few-cores-genes", default="3000", help="gene counts fitted on --few-cores cores")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per case")
    parser.add_argument("--steps", type=int, help="stop every case after this many steps (same work on every "
                        "device, a quicker look at scaling) instead of at convergence")
    args = parser.parse_args()

    started = time.perf_counter()
    rows, seconds = [], {}
    header = ["cells x genes", "device", "cores", "steps", "epochs", "converged", "fit s", "compile s",
              "ms per step", "peak RSS GB", "speed-up"]
    for platform, n_genes, cores in cases(args):
        settings = {"max_iterations": args.steps} if args.steps else {}
        r = spawn({"data": "atlas", "n_cells": args.cells, "n_genes": n_genes, "backend": "jax", "settings": settings},
                  args.timeout, env={"JAX_PLATFORMS": platform}, cores=cores)
        label = f"{args.cells:,} x {n_genes or ALL_GENES:,}"
        cores_used = "" if platform == "cuda" else str(cores or os.cpu_count())
        if "error" in r:
            rows.append([label, platform, cores_used, r["error"]] + [""] * 7)
        else:
            seconds[platform, n_genes, cores] = r["fit_seconds"]
            ratio = ""  # on the same data: the GPU against all cores, all cores against a few
            if platform == "cpu" and cores is None and ("cuda", n_genes, None) in seconds:
                ratio = f"GPU {r['fit_seconds'] / seconds['cuda', n_genes, None]:.1f}x faster"
            if platform == "cpu" and cores and ("cpu", n_genes, None) in seconds:
                ratio = f"{os.cpu_count()} cores {r['fit_seconds'] / seconds['cpu', n_genes, None]:.1f}x faster"
            rows.append([label, r.get("device", platform), cores_used, f"{r['steps']:,}", f"{r['epochs']:.1f}",
                         "yes" if r["converged"] else "no", f"{r['fit_seconds']:.1f}", f"{r['compile_seconds']:.1f}",
                         f"{r['ms_per_step']:.2f}", f"{r['peak_rss_gb']:.1f}", ratio])
        print(" | ".join(rows[-1]), f"({time.perf_counter() - started:.0f} s so far)", flush=True)
    print(table(header, rows))
    print(f"\n({time.perf_counter() - started:.0f} s in all, data preparation included)")


if __name__ == "__main__":
    main()
