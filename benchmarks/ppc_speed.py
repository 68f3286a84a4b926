"""The posterior predictive check's time at atlas width: the closed forms of scnbvi.ppc against
replicating every count with numpy, as the check did before, in one process on synthetic draws.

    python benchmarks/ppc_speed.py                      # 1,000 cells x 39,241 genes x 50 draws
    python benchmarks/ppc_speed.py --sampled-draws 50   # the replication at every draw, ~2 min
    python benchmarks/ppc_speed.py --sampled-draws 50 --second-seed   # and its own noise, ~2 min more

The replication's time grows linearly with the draws, so by default it runs 5 of them and the
figure for all is scaled from those; the bands it gives are compared with the closed forms' on
the draws both computed. The closed forms' time includes compiling their program (about a second).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scnbvi.likelihood.sampling import sample_counts  # noqa: E402
from scnbvi.ppc import BLOCK_ENTRIES, PosteriorDraws, check  # noqa: E402


def synthetic(n_cells: int, n_genes: int, n_draws: int, covariates: int, seed: int = 0):
    """Draws scattered around one parameter set with an atlas's spread of expression (most genes
    rare, a few high), counts drawn from that set, and centred covariates (None for 0)."""
    rng = np.random.default_rng(seed)
    gene_effect = rng.normal(-3.0, 2.0, n_genes)
    cell_effect = rng.normal(0.0, 0.3, n_cells)
    alpha = rng.lognormal(0.0, 1.0, n_genes)
    beta = rng.normal(0.0, 0.3, (n_genes, covariates))
    design = rng.normal(0.0, 1.0, (n_cells, covariates))
    cell_log_offset = rng.normal(0.0, 0.4, n_cells)
    gene_log_offset = np.zeros(n_genes)
    counts = sample_counts(rng, np.exp(gene_effect + (cell_effect + cell_log_offset)[:, None] + design @ beta.T), alpha)
    draws = PosteriorDraws(
        gene_effect=gene_effect + rng.normal(0.0, 0.05, (n_draws, n_genes)),
        cell_effect=cell_effect + rng.normal(0.0, 0.05, (n_draws, n_cells)),
        alpha=alpha * rng.lognormal(0.0, 0.1, (n_draws, n_genes)),
        beta=beta + rng.normal(0.0, 0.02, (n_draws, n_genes, covariates)) if covariates else None,
        coefficients=tuple(f"x{k}" for k in range(covariates)),
    )
    return sp.csr_matrix(counts), draws, cell_log_offset, gene_log_offset, design if covariates else None


def sampled_bands(draws, cell_log_offset, gene_log_offset, covariates, seed, block_entries=BLOCK_ENTRIES):
    """The check's former replication: every count drawn by numpy, in blocks of cells, reduced to
    each gene's zero fraction, mean and variance per draw; then the replicates' 90 % bands."""
    n_draws, n_cells = draws.cell_effect.shape
    n_genes = len(gene_log_offset)
    rng = np.random.default_rng(seed)
    block = max(1, block_entries // n_genes)
    zeros, sums, squares = (np.zeros((n_draws, n_genes)) for _ in range(3))
    started = reported = time.perf_counter()
    for d in range(n_draws):
        if time.perf_counter() - reported > 10:
            reported = time.perf_counter()
            logging.info("numpy replication: %d of %d draws, %.0f s", d, n_draws, reported - started)
        for start in range(0, n_cells, block):
            rows = slice(start, start + block)
            log_mu = (draws.cell_effect[d] + cell_log_offset)[rows, None] + draws.gene_effect[d] + gene_log_offset
            if covariates is not None:
                log_mu = log_mu + covariates[rows] @ draws.beta[d].T
            counts = sample_counts(rng, np.exp(log_mu), draws.alpha[d]).astype(np.float64)
            zeros[d] += (counts == 0).sum(axis=0)
            sums[d] += counts.sum(axis=0)
            squares[d] += (counts**2).sum(axis=0)
    mean = sums / n_cells
    statistics = {"zero_fraction": zeros / n_cells, "mean": mean, "variance": squares / n_cells - mean**2}
    return {name: np.quantile(value, [0.05, 0.95], axis=0) for name, value in statistics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=39_241)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--covariates", type=int, default=2, help="columns of the design (0: none)")
    parser.add_argument("--sampled-draws", type=int, default=5, help="draws the numpy replication runs")
    parser.add_argument("--second-seed", action="store_true",
                        help="replicate again with another seed: how many genes the replication's own noise flags apart")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    counts, draws, cell_log_offset, gene_log_offset, covariates = synthetic(args.cells, args.genes, args.draws,
                                                                          args.covariates)
    names = dict(cell_names=range(args.cells), gene_names=range(args.genes), seed=0)
    started = time.perf_counter()
    result = check(counts, draws, cell_log_offset, gene_log_offset, covariates, **names)
    closed_forms = time.perf_counter() - started

    few = PosteriorDraws(draws.gene_effect[: args.sampled_draws], draws.cell_effect[: args.sampled_draws],
                         draws.alpha[: args.sampled_draws],
                         None if draws.beta is None else draws.beta[: args.sampled_draws], draws.coefficients)
    started = time.perf_counter()
    bands = sampled_bands(few, cell_log_offset, gene_log_offset, covariates, seed=0)
    sampled = (time.perf_counter() - started) * args.draws / args.sampled_draws
    print(f"{args.cells} cells x {args.genes} genes x {args.draws} draws, {args.covariates} covariates")
    print(f"closed forms: {closed_forms:.1f} s; numpy replication: {sampled:.0f} s"
          + ("" if args.sampled_draws == args.draws else f" (scaled from {args.sampled_draws} draws)"))
    print(f"verdict: {result.verdict['verdict']}")
    if args.sampled_draws == args.draws:
        for name, (low, high) in bands.items():
            width = np.maximum(high - low, 1 / args.cells)
            shift = np.abs(result.genes[f"{name}_low"] - low) / width, np.abs(result.genes[f"{name}_high"] - high) / width
            observed = result.genes[f"{name}_observed"]
            differ = int(np.sum(result.genes[f"{name}_outside"] != ((observed < low) | (observed > high))))
            print(f"{name}: band limits differ by a median {np.median(shift):.2f} of the band's width; "
                  f"{differ} of {args.genes} genes flagged differently")
    if args.second_seed and args.sampled_draws == args.draws:
        again = sampled_bands(few, cell_log_offset, gene_log_offset, covariates, seed=1)
        for name, (low, high) in bands.items():
            observed = result.genes[f"{name}_observed"]
            first, second = ((observed < lo) | (observed > hi) for lo, hi in ((low, high), again[name]))
            print(f"{name}: {int(np.sum(first != second))} genes flagged differently by two numpy replications")


if __name__ == "__main__":
    main()
