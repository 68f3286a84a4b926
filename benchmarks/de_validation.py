"""Validation of covariate effects and differential expression, with the figures in the README.

Usage, from the repository root (next to ../shared/data):

    python benchmarks/de_validation.py --parts recovery,null,scale --out de_validation.md

recovery: simulated data with known per-gene effects (2,000 cells x 300 genes, condition sd
          0.7, batch sd 0.3): 90 % interval coverage and sign recovery per coefficient.
null:     real droplet cells of microglia_20k.h5ad with a condition label permuted at random:
          the share of genes called (lfsr < 0.05), for shared and per-gene dispersion.
scale:    the whole 20,000-cell file, all genes, with and without study_inferred as a
          covariate: fit time and its ratio (jax engine, scnbvi defaults).
The comparison with glmGamPoi is benchmarks/compare_glmgampoi.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from benchmark import run_parts, table  # the sibling script's helpers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DATA = REPO.parent / "shared" / "data"


def fit_with_design(counts, depth, design, gene_names=None, gene_dispersion=False, draws=1000):
    from scnbvi.inference import InferenceSettings, fit
    from scnbvi.posterior import draw_posterior

    model, result = fit(counts, np.log(depth / 1e5), np.zeros(counts.shape[1]), InferenceSettings(),
                        backend="jax", gene_names=gene_names, design=design, gene_dispersion=gene_dispersion)
    return result, (draw_posterior(model, result, draws, 0) if draws else None)


def recovery() -> str:
    from scnbvi.design import build_design
    from scnbvi.simulate import SimulationTruth, simulate_counts

    adata = simulate_counts(2000, 300, seed=1, truth=SimulationTruth(condition_effect_sd=0.7, batch_effect_sd=0.3))
    design = build_design(adata.obs, categorical=["condition", "batch"],
                          reference={"condition": "control", "batch": "b1"})
    result, idata = fit_with_design(adata.X, adata.obs["depth"].to_numpy(), design, adata.var_names)
    beta = idata.posterior["beta"].values[0]
    rows = []
    for k, name in enumerate(design.names):
        true = adata.var[f"true_beta_{name}"].to_numpy()
        low, high = np.quantile(beta[:, :, k], [0.05, 0.95], axis=0)
        large = np.abs(true) >= 0.5
        signs = np.mean(np.sign(beta[:, large, k].mean(axis=0)) == np.sign(true[large])) if large.any() else np.nan
        rows.append([name, f"{np.mean((low < true) & (true < high)):.3f}", f"{large.sum()}", f"{signs:.3f}",
                     f"{np.corrcoef(beta[:, :, k].mean(axis=0), true)[0, 1]:.4f}",
                     f"{idata.posterior['tau'].values[0, :, k].mean():.3f} (true sd {true.std():.3f})"])
    header = ["coefficient", "90 % interval coverage", "genes with abs(beta) >= 0.5", "signs recovered",
              "r (mean vs truth)", "tau"]
    return f"fit {result.fit_seconds:.1f} s, {result.steps} steps\n\n" + table(header, rows)


def null() -> str:
    from scnbvi.data import read_counts, slice_counts
    from scnbvi.de import contrast_table
    from scnbvi.design import build_design

    adata = read_counts(DATA / "microglia_20k.h5ad")
    depth_all = np.asarray(adata.X.sum(axis=1)).ravel().astype(float)
    adata.obs["total_counts"] = depth_all
    adata = adata[adata.obs["study_inferred"] == "S2_droplet"].copy()
    adata = slice_counts(adata, cells_method="random", n_cells=1500, genes_method="hvg", n_genes=300, seed=0,
                         drop_zero_cells=True)
    adata.obs["label"] = np.random.default_rng(0).permutation(np.array(["a", "b"])[np.arange(adata.n_obs) % 2])
    design = build_design(adata.obs, categorical=["label"], reference={"label": "a"})
    depth = adata.obs["total_counts"].to_numpy()
    rows = []
    for gene_dispersion in (False, True):
        result, idata = fit_with_design(adata.X, depth, design, adata.var_names, gene_dispersion=gene_dispersion)
        de = contrast_table(idata, design, ("label", "b", "a"), adata.X, depth)
        rows.append(["per gene" if gene_dispersion else "shared", f"{np.mean(de['lfsr'] < 0.05):.3f}",
                     f"{np.mean(de['lfsr'] < 0.01):.3f}", f"{idata.posterior['tau'].mean().item():.3f}",
                     f"{result.fit_seconds:.1f}"])
    header = ["dispersion", "share of genes with lfsr < 0.05", "lfsr < 0.01", "tau", "fit s"]
    return f"{adata.n_obs} S2_droplet cells x {adata.n_vars} HVGs, label permuted at random\n\n" + table(header, rows)


def scale() -> str:
    from scnbvi.data import read_counts
    from scnbvi.design import build_design

    adata = read_counts(DATA / "microglia_20k.h5ad")
    keep = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    adata = adata[keep].copy()
    adata.obs["study_inferred"] = adata.obs["study_inferred"].astype(str)
    depth = np.asarray(adata.X.sum(axis=1)).ravel().astype(float)
    rows, seconds = [], {}
    for name, design in (("none", None), ("study_inferred", build_design(adata.obs, categorical=["study_inferred"]))):
        start = time.perf_counter()
        result, _ = fit_with_design(adata.X, depth, design, draws=0)
        seconds[name] = result.fit_seconds
        rows.append([name, f"{result.fit_seconds:.1f}", f"{result.compile_seconds:.1f}", f"{result.steps:,}",
                     f"{result.epochs:.1f}", "yes" if result.converged else "no",
                     f"{1000 * result.fit_seconds / result.steps:.1f}", f"{time.perf_counter() - start:.1f}"])
    header = ["design", "fit s", "compile s", "steps", "epochs", "converged", "ms per step", "wall s"]
    ratio = seconds["study_inferred"] / seconds["none"]
    return (f"{adata.n_obs:,} cells x {adata.n_vars:,} genes; fit time with / without the covariate: "
            f"{ratio:.2f}\n\n" + table(header, rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="recovery,null,scale")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    run_parts(args.parts, {"recovery": recovery, "null": null, "scale": scale}, args.out, [])


if __name__ == "__main__":
    main()
