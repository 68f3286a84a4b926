"""Validation of covariate effects and differential expression, with the figures in the README.

Usage, from the repository root (next to ../shared/data):

    python benchmarks/de_validation.py --parts cells,donors,shrinkage --out de_validation.md
    python benchmarks/de_validation.py --parts donors --seeds 5
    python benchmarks/de_validation.py --parts recovery,null,scale

cells:    known effects spiked into real cells (binomial thinning), cells as the replicates:
          5,000 droplet cells of microglia_20k.h5ad x 3,000 HVGs, a random condition and a
          batch without effect, 150 genes (of those detected in at least 10 % of cells)
          halved in the treated cells. Called genes,
          sensitivity (right sign) and false share of scnbvi, glmGamPoi and scanpy's Wilcoxon.
donors:   the same cells split at random into 8 donors (4 control, 4 treated), each donor x
          gene thinned with its own keep probability (uniform 0.5-1: donor-to-donor variation
          only), then 100 genes halved in the treated donors. scnbvi with the donor as a random
          effect and without, glmGamPoi on cells and on pseudobulk, PyDESeq2 on pseudobulk,
          Wilcoxon; the fit time with and without the random effect; and two rules that know the
          truth, to show what the data allow: the best cut of scnbvi's lfsr order, and the Bayes
          rule of the spike-in's own prior on scnbvi's estimates.
shrinkage: adaptive shrinkage of 40,000 genes, seconds.
--seeds N repeats cells and donors with N consecutive seeds of the spike-in (condition, donors,
thinning, changed genes; from seed 1 for cells, 2 for donors): a table per seed, then the mean
per method, since a false share of 5 % is a handful of genes in any one draw.
The R comparisons need apt-get install -y r-bioc-glmgampoi (benchmarks/de_glmgampoi.R).

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
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
from benchmark import run_parts, table  # the sibling script's helpers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DATA = REPO.parent / "shared" / "data"


def fit_with_design(counts, depth, design, gene_names=None, gene_dispersion=True, draws=1000):
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
    result, idata = fit_with_design(adata.X, adata.obs["depth"].to_numpy(), design, adata.var_names, False)
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
    from scnbvi.data import read_counts
    from scnbvi.de import contrast_table
    from scnbvi.design import build_design
    from scnbvi.qc import slice_counts

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
        result, idata = fit_with_design(adata.X, depth, design, adata.var_names, gene_dispersion)
        de = contrast_table(idata, design, ("label", "b", "a"), adata.X, depth).table
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
        result, _ = fit_with_design(adata.X, depth, design, gene_dispersion=False, draws=0)
        seconds[name] = result.fit_seconds
        rows.append([name, f"{result.fit_seconds:.1f}", f"{result.compile_seconds:.1f}", f"{result.steps:,}",
                     f"{result.epochs:.1f}", "yes" if result.converged else "no",
                     f"{1000 * result.fit_seconds / result.steps:.1f}", f"{time.perf_counter() - start:.1f}"])
    header = ["design", "fit s", "compile s", "steps", "epochs", "converged", "ms per step", "wall s"]
    ratio = seconds["study_inferred"] / seconds["none"]
    return (f"{adata.n_obs:,} cells x {adata.n_vars:,} genes; fit time with / without the covariate: "
            f"{ratio:.2f}\n\n" + table(header, rows))


# --------------------------------------------------------------------------- spike-ins

LEVEL = 0.05
HEADER = ["method", "called", "sensitivity", "false share", "notes"]
R_SCRIPT = REPO / "benchmarks" / "de_glmgampoi.R"


def droplet_cells(n_cells=5000, n_genes=3000, seed=0):
    """Real droplet cells and their most variable genes, as int CSR counts."""
    from scnbvi.data import read_counts
    from scnbvi.qc import slice_counts

    adata = read_counts(DATA / "microglia_20k.h5ad")
    adata = adata[adata.obs["study_inferred"] == "S2_droplet"].copy()
    return slice_counts(adata, cells_method="random", n_cells=n_cells, genes_method="hvg", n_genes=n_genes,
                        seed=seed, drop_zero_cells=True)


def thin(counts: sp.csr_matrix, keep: np.ndarray, rng) -> sp.csr_matrix:
    """Binomial thinning: each count kept with probability keep[cell, gene]."""
    counts = sp.csr_matrix(counts)
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    thinned = counts.copy()
    thinned.data = rng.binomial(counts.data, keep[rows, counts.indices]).astype(counts.dtype)
    thinned.eliminate_zeros()
    return thinned


def spike_in(adata, n_true, donors: int | None, seed: int):
    """A random condition (by cell, or by donor), a batch without effect, donor-to-donor
    thinning when ``donors`` is given, and ``n_true`` genes halved in the treated cells. Adds
    obs condition, batch, (donor,) depth; returns the thinned data and each gene's true log2FC."""
    rng = np.random.default_rng(seed)
    adata = adata.copy()
    n_cells, n_genes = adata.shape
    keep = np.ones((n_cells, n_genes))
    if donors:
        donor = rng.permutation(np.arange(n_cells) % donors)
        adata.obs["donor"] = [f"donor{d}" for d in donor]
        treated = donor >= donors // 2
        keep *= rng.uniform(0.5, 1.0, size=(donors, n_genes))[donor]
    else:
        treated = rng.permutation(np.arange(n_cells) % 2 == 1)
    adata.obs["condition"] = np.where(treated, "treated", "control")
    adata.obs["batch"] = rng.permutation(np.array(["b1", "b2"])[np.arange(n_cells) % 2])
    truth = np.zeros(n_genes)
    # Among genes detected in at least 10 % of cells: halving a gene seen in a handful of cells
    # is beyond any method, and says nothing about error rates.
    detected = np.asarray((adata.X > 0).mean(axis=0)).ravel()
    changed = rng.choice(np.flatnonzero(detected >= 0.1), n_true, replace=False)
    truth[changed] = -1.0
    keep[np.ix_(treated, changed)] *= 0.5
    adata.X = thin(adata.X, keep, rng)
    adata.obs["depth"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(float)
    adata = adata[adata.obs["depth"] > 0].copy()
    return adata, truth


def score(name, called, sign, truth, extra="") -> list:
    called = np.asarray(called, bool)
    right = called & (np.sign(sign) == np.sign(truth)) & (truth != 0)
    false = int(called.sum() - right.sum())
    return [name, int(called.sum()), f"{right.sum() / np.sum(truth != 0):.3f}",
            f"{false / max(called.sum(), 1):.3f}", extra]


def best_cut(ranking, sign, truth) -> np.ndarray:
    """The shortest top-n of ``ranking`` (most significant first) with the most right calls of any whose
    false share is at most LEVEL: what the order allows at that rate when the cut is chosen knowing the truth."""
    right = np.cumsum((np.sign(sign[ranking]) == np.sign(truth[ranking])) & (truth[ranking] != 0))
    within = right >= (1 - LEVEL) * np.arange(1, len(ranking) + 1)
    called = np.zeros(len(truth), bool)
    if within.any():
        called[ranking[: np.flatnonzero(within & (right == right[within].max()))[0] + 1]] = True
    return called


def true_prior_calls(estimate, se, df, truth) -> tuple[np.ndarray, np.ndarray]:
    """The Bayes rule that knows the prior the spike-in drew from (the share of changed genes and
    their exact log2FC) and takes scnbvi's unshrunk estimate, standard error and t likelihood: genes
    called at Bayesian FDR < LEVEL (the mean posterior null probability of the set), and each gene's
    most probable change. No method that must learn the prior from the data does better on average."""
    from scipy import stats

    atoms, counts = np.unique(truth, return_counts=True)
    likelihood = counts / len(truth) * stats.t.pdf((estimate[:, None] - atoms) / se[:, None], df)
    posterior = likelihood / likelihood.sum(axis=1, keepdims=True)
    null = posterior[:, atoms == 0].sum(axis=1)
    order = np.argsort(null, kind="stable")
    called = np.zeros(len(truth), bool)
    called[order[np.cumsum(null[order]) / np.arange(1, len(null) + 1) < LEVEL]] = True
    changes = np.where(atoms == 0, 0.0, posterior)
    return called, atoms[np.argmax(changes, axis=1)]


def scnbvi_rows(adata, truth, categorical, random=(), label="scnbvi", ceilings=False):
    """scnbvi's calls at lfsr and svalue < LEVEL; with ``ceilings``, two rules that know the truth: the best
    cut of its lfsr order, and the true prior's Bayes rule on its estimates."""
    from scnbvi.de import contrast_table
    from scnbvi.design import build_design

    design = build_design(adata.obs, categorical=categorical, random=random,
                          reference={"condition": "control", "batch": "b1"})
    depth = adata.obs["depth"].to_numpy()
    result, idata = fit_with_design(adata.X, depth, design, adata.var_names)
    started = time.perf_counter()
    de = contrast_table(idata, design, ("condition", "treated", "control"), adata.X, depth)
    shrink_seconds = time.perf_counter() - started
    table_ = de.table.reindex(adata.var_names)
    lfc = table_["log2_fold_change"].to_numpy()
    hits = (table_["lfsr"] < LEVEL).to_numpy() & (truth != 0)
    median_hit = np.median(np.abs(lfc[hits])) if hits.any() else np.nan
    best = best_cut(np.argsort(table_["lfsr"].to_numpy(), kind="stable"), lfc, truth)
    note = (f"fit {result.fit_seconds:.1f} s, {result.steps} steps; DE {shrink_seconds:.1f} s; median abs log2FC of "
            f"true hits {median_hit:.2f} (truth 1.00); best cut of the lfsr order at <= {LEVEL} false: sensitivity "
            f"{np.sum(best & (truth != 0)) / np.sum(truth != 0):.2f}; {de.describe()}")
    rows = [score(f"{label}, lfsr < {LEVEL}", table_["lfsr"] < LEVEL, lfc, truth, note),
            score(f"{label}, svalue < {LEVEL}", table_["svalue"] < LEVEL, lfc, truth)]
    if ceilings:
        rows.append(score(f"{label}, best cut of the lfsr order (knowing the truth)", best, lfc, truth))
        df = table_["df"].iloc[0] if "df" in table_ else np.inf
        called, change = true_prior_calls(table_["log2_fold_change_unshrunk"].to_numpy(),
                                          table_["log2_fold_change_unshrunk_sd"].to_numpy(), df, truth)
        rows.append(score(f"{label}, estimates through the true prior, Bayesian FDR < {LEVEL}", called, change, truth))
    return rows, result.fit_seconds


def glmgampoi(counts, columns: pd.DataFrame, genes, formula, work: Path):
    """glmGamPoi's test of condition treated vs control: (adjusted p, log2FC) per gene."""
    work.mkdir(parents=True, exist_ok=True)
    scipy.io.mmwrite(work / "counts.mtx", sp.csr_matrix(counts).T.tocoo())
    columns.to_csv(work / "columns.tsv", sep="\t", index=False)
    pd.DataFrame({"gene": list(genes)}).to_csv(work / "genes.tsv", sep="\t", index=False)
    subprocess.run(["Rscript", str(R_SCRIPT), str(work), str(work / "result.tsv"), formula, "condition", "treated",
                    "control"], check=True)
    result = pd.read_csv(work / "result.tsv", sep="\t", index_col="gene").reindex(list(genes))
    return result["adj_pval"].fillna(1.0).to_numpy(), result["lfc"].fillna(0.0).to_numpy()


def wilcoxon(adata):
    import scanpy as sc

    normalised = adata.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    sc.tl.rank_genes_groups(normalised, "condition", groups=["treated"], reference="control", method="wilcoxon")
    result = sc.get.rank_genes_groups_df(normalised, "treated").set_index("names").reindex(adata.var_names)
    return result["pvals_adj"].to_numpy(), result["logfoldchanges"].to_numpy()


def case_cells(seed: int) -> tuple[str, list]:
    adata, truth = spike_in(droplet_cells(), 150, None, seed=seed)
    rows, _ = scnbvi_rows(adata, truth, ["condition", "batch"])
    with tempfile.TemporaryDirectory() as work:
        columns = adata.obs[["condition", "batch"]].assign(size_factor=adata.obs["depth"] / 1e5)
        padj, lfc = glmgampoi(adata.X, columns, adata.var_names, "~ condition + batch", Path(work))
    rows.append(score("glmGamPoi on cells, BH 0.05", padj < LEVEL, lfc, truth))
    padj, lfc = wilcoxon(adata)
    rows.append(score("scanpy Wilcoxon, BH 0.05", padj < LEVEL, lfc, truth))
    return (f"{adata.n_obs:,} droplet cells x {adata.n_vars:,} HVGs, condition at random, batch without effect, "
            f"{int(np.sum(truth != 0))} genes halved in treated cells"), rows


def case_donors(seed: int) -> tuple[str, list]:
    from scnbvi.design import build_design
    from scnbvi.pseudobulk import pseudobulk_counts, pydeseq2_table

    adata, truth = spike_in(droplet_cells(), 100, 8, seed=seed)
    rows, with_random = scnbvi_rows(adata, truth, ["condition", "batch"], ["donor"], "scnbvi, donor random",
                                    ceilings=True)
    cell_rows, without = scnbvi_rows(adata, truth, ["condition", "batch"], (), "scnbvi, cells as replicates")
    rows += cell_rows
    design = build_design(adata.obs, categorical=["condition"], random=["donor"], reference={"condition": "control"})
    summed, metadata = pseudobulk_counts(adata.X, design, "condition", adata.var_names)
    deseq = pydeseq2_table(summed, metadata, ("condition", "treated", "control"), paired=False).reindex(adata.var_names)
    rows.append(score("PyDESeq2 pseudobulk, BH 0.05", deseq["padj"].fillna(1.0) < LEVEL,
                      deseq["log2FoldChange"].fillna(0.0), truth))
    with tempfile.TemporaryDirectory() as work:
        columns = adata.obs[["condition", "batch"]].assign(size_factor=adata.obs["depth"] / 1e5)
        padj, lfc = glmgampoi(adata.X, columns, adata.var_names, "~ condition + batch", Path(work) / "cells")
        rows.append(score("glmGamPoi on cells, BH 0.05", padj < LEVEL, lfc, truth))
        padj, lfc = glmgampoi(summed.to_numpy(), metadata[["condition"]], adata.var_names, "~ condition",
                              Path(work) / "pseudobulk")
        rows.append(score("glmGamPoi pseudobulk, BH 0.05", padj < LEVEL, lfc, truth))
    padj, lfc = wilcoxon(adata)
    rows.append(score("scanpy Wilcoxon, BH 0.05", padj < LEVEL, lfc, truth))
    return (f"{adata.n_obs:,} droplet cells x {adata.n_vars:,} HVGs in 8 donors (4 control, 4 treated), each donor x "
            f"gene thinned by its own uniform(0.5, 1), {int(np.sum(truth != 0))} genes halved in treated donors; "
            f"fit time with / without the donor random effect: {with_random / without:.2f}"), rows


def repeated(case, first_seed: int, n_seeds: int) -> str:
    """``case`` with ``n_seeds`` consecutive spike-in seeds: each seed's table, then each
    method's mean called, sensitivity and false share over the seeds."""
    sections, by_method = [], {}
    for seed in range(first_seed, first_seed + n_seeds):
        heading, rows = case(seed)
        sections.append(f"seed {seed}: {heading}\n\n" + table(HEADER, rows))
        for name, called, sensitivity, false_share, _ in rows:
            by_method.setdefault(name, []).append([called, float(sensitivity), float(false_share)])
    if n_seeds > 1:
        means = [[name, f"{np.mean(values, axis=0)[0]:.1f}", *(f"{v:.3f}" for v in np.mean(values, axis=0)[1:]), ""]
                 for name, values in by_method.items()]
        sections.append(f"mean over seeds {first_seed}-{first_seed + n_seeds - 1}\n\n" + table(HEADER, means))
    return "\n\n".join(sections)


def shrinkage_speed() -> str:
    """Seconds of adaptive shrinkage of 40,000 genes with a normal likelihood (cells as replicates) and
    with a t likelihood of 6 and of 60 degrees of freedom (samples as replicates), three runs each."""
    from scnbvi.shrinkage import adaptive_shrinkage

    rng = np.random.default_rng(0)
    se = rng.uniform(0.05, 0.5, 40_000)
    effect = np.where(rng.random(40_000) < 0.05, rng.normal(0, 1, 40_000), 0.0)
    rows = []
    for df in (np.inf, 6.0, 60.0):
        estimate = effect + se * (rng.standard_t(df, 40_000) if np.isfinite(df) else rng.normal(0, 1, 40_000))
        for run in range(3):
            started = time.perf_counter()
            shrunk = adaptive_shrinkage(estimate, se, df=df)
            rows.append([f"{df:g}", run + 1, f"{time.perf_counter() - started:.2f}", f"{shrunk.null_share:.3f}",
                         int(np.sum(shrunk.lfsr < LEVEL))])
    return "40,000 genes, 5 % with effects\n\n" + table(["df", "run", "seconds", "null share", "lfsr < 0.05"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="cells,donors,shrinkage")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seeds", type=int, default=1, help="spike-in seeds per case (cells, donors)")
    args = parser.parse_args()
    parts = {"cells": functools.partial(repeated, case_cells, 1, args.seeds),
             "donors": functools.partial(repeated, case_donors, 2, args.seeds), "shrinkage": shrinkage_speed,
             "recovery": recovery, "null": null, "scale": scale}
    run_parts(args.parts, parts, args.out, [])


if __name__ == "__main__":
    main()
