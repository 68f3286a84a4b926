"""One shared NB dispersion or one per gene: evidence for the default of ``gene_dispersion``.

``gene_dispersion=False``: alpha ~ HalfCauchy, shared by all genes; ``True``: log alpha_g ~
Normal(m, s) with m and s learned. Both are fitted (jax backend, default settings, seed 0) to
80 % of the cells of each real data set and judged by

- held-out log-likelihood: each of the other 20 % of cells gets its own cell effect by 1-D
  maximum likelihood given the point estimates (mean of q) of everything else, then its NB
  log-likelihood summed over genes; the mean per cell, and the paired difference per-gene
  minus shared (with its standard error over held-out cells);
- zero calibration on the training cells, at the point estimates: per gene, observed vs
  expected zero fraction (mean absolute difference over genes), and the share of genes whose
  observed zero fraction lies outside the central 90 % of the zero fractions of replicated data;
- seconds (the whole ``fit`` call, and its compilation) and optimisation steps.

Data sets: the seed demo (all cells, genes with any count); 2,000 random cells of
microglia_20k with its 1,000 HVGs and ``study_inferred`` as design; 2,000 random S2_droplet
cells with their 1,000 HVGs. Depth of a cell is its total over all genes of the file.

Usage, from the repository root: ``.venv/bin/python benchmarks/dispersion.py``; the table is
printed and written to results/benchmark/dispersion.md.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.stats import nbinom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "results" / "benchmark" / "dispersion.md"
DEPTH_REF = 1e5
SEED = 0
TEST_SHARE = 0.2
REPLICATES = 200
VARIANTS = {"shared": False, "per-gene": True}


def load_data_sets():
    """(name, counts CSR, depth per cell, design or None) of each data set."""
    from scnbvi.data import read_counts
    from scnbvi.design import build_design
    from scnbvi.qc import slice_counts

    def with_depth(adata):
        # The slice keeps obs, so the depth over all genes travels with each cell.
        adata.obs["depth"] = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
        return adata

    demo = slice_counts(with_depth(read_counts(DATA / "seed_demo_1000x500.h5ad")),
                        drop_zero_cells=True, drop_zero_genes=True)
    microglia = with_depth(read_counts(DATA / "microglia_20k.h5ad"))
    mixed = slice_counts(microglia, cells_method="random", n_cells=2000, genes_method="hvg", n_genes=1000,
                         seed=SEED, drop_zero_cells=True)
    mixed.obs["study_inferred"] = mixed.obs["study_inferred"].cat.remove_unused_categories()
    droplet = slice_counts(microglia, obs_filters={"study_inferred": ["S2_droplet"]}, cells_method="random",
                           n_cells=2000, genes_method="hvg", n_genes=1000, seed=SEED, drop_zero_cells=True)
    return [
        ("seed demo", demo, None),
        ("microglia 2k, design study", mixed, build_design(mixed.obs, categorical=["study_inferred"])),
        ("S2_droplet 2k", droplet, None),
    ]


def split_cells(n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted training and held-out cell positions, seeded."""
    order = np.random.default_rng(SEED).permutation(n_cells)
    n_test = round(TEST_SHARE * n_cells)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def fixed_log_mu(estimate, log_offset, design_rows, design_mean) -> np.ndarray:
    """Cells x genes log mean without the cell effect, with the design centred as the model does
    it: on the training cells' mean."""
    log_mu = estimate["gene_effect"][None, :] + log_offset[:, None]
    if design_rows is not None:
        log_mu = log_mu + (design_rows - design_mean) @ estimate["beta"].T
    return log_mu


def nb_logpmf(counts, log_mu, alpha) -> np.ndarray:
    return nbinom.logpmf(counts, alpha, 1.0 / (1.0 + np.exp(log_mu) / alpha))


def cell_effect_mle(counts: np.ndarray, log_mu: np.ndarray, alpha) -> np.ndarray:
    """Each cell's effect c maximising sum_g log NB(y_g | exp(log_mu_g + c), alpha), by Newton
    steps from the Poisson solution; the objective is concave in c, so this converges."""
    effect = np.log(counts.sum(axis=1) / np.exp(log_mu).sum(axis=1))
    for _ in range(100):
        mu = np.exp(log_mu + effect[:, None])
        weight = alpha / (alpha + mu)
        gradient = np.sum(weight * (counts - mu), axis=1)
        curvature = np.sum(weight * mu * (counts + alpha) / (alpha + mu), axis=1)
        step = np.clip(gradient / curvature, -1.0, 1.0)
        effect += step
        if np.max(np.abs(step)) < 1e-9:
            return effect
    raise RuntimeError(f"held-out cell effects did not converge (largest last step {np.max(np.abs(step)):.2g})")


def zero_calibration(counts: sp.csr_matrix, log_mu: np.ndarray, alpha, seed: int) -> tuple[float, float]:
    """Mean |observed - expected| zero fraction over genes, and the share of genes whose observed
    zero fraction is outside the central 90 % of ``REPLICATES`` replicated data sets. Only
    whether a count is zero matters, so replicates draw Bernoulli(P(y = 0)) per entry."""
    n_cells, n_genes = log_mu.shape
    p_zero = np.exp(-alpha * np.log1p(np.exp(log_mu) / alpha))
    observed = 1.0 - np.bincount(counts.indices, minlength=n_genes) / n_cells
    rng = np.random.default_rng([seed, 2])
    low, high = np.empty(n_genes), np.empty(n_genes)
    block = max(1, 4_000_000 // (REPLICATES * n_cells))
    for start in range(0, n_genes, block):
        genes = slice(start, start + block)
        zeros = (rng.random((REPLICATES, n_cells, p_zero[:, genes].shape[1])) < p_zero[:, genes]).mean(axis=1)
        # Outward rounding: replicated fractions are discrete, and interpolating between them
        # would narrow the range below 90 %.
        low[genes] = np.quantile(zeros, 0.05, axis=0, method="lower")
        high[genes] = np.quantile(zeros, 0.95, axis=0, method="higher")
    outside = (observed < low) | (observed > high)
    return float(np.mean(np.abs(observed - p_zero.mean(axis=0)))), float(outside.mean())


def evaluate(counts: sp.csr_matrix, depth: np.ndarray, design, gene_dispersion: bool) -> dict:
    """Fit one variant on the training cells and score it (see the module docstring)."""
    from scnbvi.inference import InferenceSettings, fit
    from scnbvi.posterior import point_estimate

    train, test = split_cells(counts.shape[0])
    log_offset = np.log(depth / DEPTH_REF)
    train_design = None if design is None else dataclasses.replace(design, matrix=design.matrix[train])
    start = time.perf_counter()
    model, result = fit(counts[train], log_offset[train], np.zeros(counts.shape[1]), InferenceSettings(seed=SEED),
                        backend="jax", gene_dispersion=gene_dispersion, design=train_design)
    seconds = time.perf_counter() - start
    estimate = point_estimate(model, result)
    alpha = np.asarray(estimate["alpha"], dtype=np.float64)
    rows = (lambda cells: None) if design is None else (lambda cells: design.matrix[cells])
    mean = None if design is None else design.matrix[train].mean(axis=0)

    held_out = counts[test].toarray().astype(np.float64)
    test_log_mu = fixed_log_mu(estimate, log_offset[test], rows(test), mean)
    test_log_mu += cell_effect_mle(held_out, test_log_mu, alpha)[:, None]
    train_log_mu = fixed_log_mu(estimate, log_offset[train], rows(train), mean) + estimate["cell_effect"][:, None]
    zero_mad, zero_outside = zero_calibration(counts[train], train_log_mu, alpha, SEED)
    return {
        "held_out": nb_logpmf(held_out, test_log_mu, alpha).sum(axis=1),
        "alpha": alpha,
        "zero_mad": zero_mad,
        "zero_outside": zero_outside,
        "seconds": seconds,
        "compile": result.compile_seconds,
        "steps": result.steps,
        "converged": result.converged,
        "cells": (len(train), len(test)),
    }


def describe_alpha(alpha: np.ndarray) -> str:
    if alpha.ndim == 0:
        return f"{float(alpha):.3g}"
    low, median, high = np.quantile(alpha, [0.05, 0.5, 0.95])
    return f"{median:.3g} [{low:.3g}, {high:.3g}]"


def table(results: dict) -> str:
    header = ["data set", "cells fit / held out x genes", "dispersion", "alpha (median [5 %, 95 %])",
              "held-out log-lik / cell", "per-gene - shared (± SE)", "zero-frac MAD",
              "genes outside 90 %", "fit s (compile)", "steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (name, n_genes), by_variant in results.items():
        gain = by_variant["per-gene"]["held_out"] - by_variant["shared"]["held_out"]
        for variant, r in by_variant.items():
            difference = "" if variant == "shared" else f"{gain.mean():+.2f} (± {gain.std(ddof=1) / np.sqrt(len(gain)):.2f})"
            lines.append("| " + " | ".join([
                name, f"{r['cells'][0]:,} / {r['cells'][1]:,} x {n_genes:,}", variant, describe_alpha(r["alpha"]),
                f"{r['held_out'].mean():.2f}", difference, f"{r['zero_mad']:.4f}", f"{100 * r['zero_outside']:.1f} %",
                f"{r['seconds']:.1f} ({r['compile']:.1f})", f"{r['steps']:,}" + ("" if r["converged"] else " (max)"),
            ]) + " |")
    return "\n".join(lines)


def recommendation(results: dict) -> str:
    """The variant with the higher held-out log-likelihood on more data sets, and by how much."""
    gains = {name: v["per-gene"]["held_out"] - v["shared"]["held_out"] for (name, _), v in results.items()}
    wins = [name for name, gain in gains.items() if gain.mean() > 0]
    clear = [name for name, gain in gains.items()
             if abs(gain.mean()) > 2 * gain.std(ddof=1) / np.sqrt(len(gain))]
    winner, flag = ("per-gene", True) if 2 * len(wins) > len(gains) else ("shared", False)
    won = wins if flag else [name for name in gains if name not in wins]
    per_cell = ", ".join(f"{name} {gain.mean():+.2f}" for name, gain in gains.items())
    return (f"Recommendation: default gene_dispersion={flag} ({winner} dispersion): higher held-out "
            f"log-likelihood on {len(won)} of {len(gains)} real data sets ({len(set(won) & set(clear))} by more "
            f"than 2 SE); per-gene minus shared, nats per held-out cell: {per_cell}.")


def main() -> None:
    results = {}
    for name, adata, design in load_data_sets():
        depth = adata.obs["depth"].to_numpy()
        for variant, gene_dispersion in VARIANTS.items():
            print(f"{name}: {adata.n_obs} x {adata.n_vars}, {variant} dispersion ...", file=sys.stderr, flush=True)
            results.setdefault((name, adata.n_vars), {})[variant] = evaluate(adata.X, depth, design, gene_dispersion)
    report = f"{table(results)}\n\n{recommendation(results)}\n"
    print(report)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(report)


if __name__ == "__main__":
    main()
