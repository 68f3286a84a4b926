"""The atlas-size fits on one GPU, against the same machine's CPU cores in the same run.

Each case runs in its own process (``benchmark.py``'s ``run_case``), the ``jax`` backend with
the default settings, to convergence (or divergence, reported as the case's error); the data are the 20,000 real cells stacked to 186,224 (as
``benchmark.py`` part 4), prepared on the first run and cached under ``results/benchmark``.
Needs the project's environment with a CUDA-enabled jax. From the repository root:

    python benchmarks/gpu_benchmark.py                  # the full table (its run time is still to be measured)
    python benchmarks/gpu_benchmark.py --cells 5000 --gpu-genes 500 --cpu-genes 500   # a quick look

Prints one table: per case the device, steps, epochs, fit and compile seconds, ms per step, and
the GPU's speed-up over the CPU where both ran the same data.
"""

from __future__ import annotations

import argparse
import time

from benchmark import spawn, table

ALL_GENES = 39_241


def genes_option(text: str) -> list[int | None]:
    """``3000,all`` -> [3000, None] (None: every gene)."""
    return [None if value == "all" else int(value) for value in text.split(",") if value]


def case(n_cells: int, n_genes: int | None, platform: str, timeout: float) -> dict:
    """One converged fit on ``platform`` (``cuda`` or ``cpu``)."""
    return spawn({"data": "atlas", "n_cells": n_cells, "n_genes": n_genes, "backend": "jax"}, timeout,
                 env={"JAX_PLATFORMS": platform})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=186_224)
    parser.add_argument("--gpu-genes", default="3000,all", help="gene counts fitted on the GPU ('all': every gene)")
    parser.add_argument("--cpu-genes", default="3000", help="gene counts fitted on the CPU cores too")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per case")
    args = parser.parse_args()

    started = time.perf_counter()
    rows, gpu_seconds = [], {}
    for platform, genes in (("cuda", genes_option(args.gpu_genes)), ("cpu", genes_option(args.cpu_genes))):
        for n_genes in genes:
            r = case(args.cells, n_genes, platform, args.timeout)
            label = f"{args.cells:,} x {n_genes or ALL_GENES:,}"
            if "error" in r:
                rows.append([label, platform, r["error"]] + [""] * 7)
                continue
            if platform == "cuda":
                gpu_seconds[n_genes] = r["fit_seconds"]
            speed_up = f"{r['fit_seconds'] / gpu_seconds[n_genes]:.1f}x" if platform == "cpu" and n_genes in gpu_seconds else ""
            rows.append([label, r.get("device", platform), f"{r['steps']:,}", f"{r['epochs']:.1f}",
                         "yes" if r["converged"] else "no", f"{r['fit_seconds']:.1f}", f"{r['compile_seconds']:.1f}",
                         f"{r['ms_per_step']:.2f}", f"{r['peak_rss_gb']:.1f}", speed_up])
    header = ["cells x genes", "device", "steps", "epochs", "converged", "fit s", "compile s", "ms per step",
              "peak RSS GB", "GPU speed-up"]
    print(table(header, rows))
    print(f"\n({time.perf_counter() - started:.0f} s in all, data preparation included)")


if __name__ == "__main__":
    main()
