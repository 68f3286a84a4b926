"""scnbvi's per-gene covariate effects and dispersions against glmGamPoi, the reference NB GLM.

Both fit the same real slice: the same cells, genes, size factors and one categorical design
column, with log mu_gc = log(s_c / 1e5) + intercept_g + beta_g[level of c]. glmGamPoi
(``benchmarks/glmgampoi.R``, R package from ``apt-get install -y r-bioc-glmgampoi``) fits it
by maximum likelihood; scnbvi fits its hierarchical model with the same design by ADVI.

Usage, from the repository root:

    .venv/bin/python benchmarks/compare_glmgampoi.py                   # both sides, compared
    .venv/bin/python benchmarks/compare_glmgampoi.py --reference-only  # glmGamPoi side alone

The slice: every cell of the design column's rarest level (S1_plate) plus a seeded sample of
the other levels, the rest of ``--n-cells`` split evenly between them, so that each level has
enough cells for its fold changes. Genes: detected in at least ``--min-cells`` cells of the slice
and in at least one cell of every level (a level without any count has an infinite maximum-
likelihood fold change), ranked by mean depth-normalised expression (each cell's counts over its
total, so the few very deep plate cells do not decide the ranking alone), top ``--n-genes``.
Size factor of a cell: its total count over all genes of the file / 1e5, i.e. scnbvi's per-cell
offset log(s_i / s_ref) with s_ref = 1e5. Cells left without counts in the chosen genes are
dropped.

Written under ``--out`` (default results/benchmark/glmgampoi/): ``export/`` (the R script's
input), ``glmgampoi/`` (its output), ``comparison.png`` and ``comparison.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
R_SCRIPT = REPO / "benchmarks" / "glmgampoi.R"
DEPTH_REF = 1e5


# --------------------------------------------------------------------------- data


def real_slice(path, column: str, n_cells: int, n_genes: int, min_cells: int, seed: int):
    """Counts (cells x genes CSR), obs (size_factor and ``column``), gene names of the slice,
    and how many sampled cells were dropped for having no counts in its genes."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    counts = sp.csr_matrix(adata.X)
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    # Unused categories (the file lists one with no cells) would give an all-zero design column.
    levels = adata.obs[column].astype(str).to_numpy()
    has_depth = totals > 0
    by_level = {level: np.flatnonzero((levels == level) & has_depth) for level in np.unique(levels[has_depth])}
    rarest = min(by_level, key=lambda level: len(by_level[level]))
    others = sorted(set(by_level) - {rarest})
    share = max(n_cells - len(by_level[rarest]), 0) // len(others)
    rng = np.random.default_rng(seed)
    picked = [by_level[rarest]] + [
        rng.choice(by_level[level], min(share, len(by_level[level])), replace=False) for level in others
    ]
    cells = np.sort(np.concatenate(picked))
    counts, levels, totals = counts[cells], levels[cells], totals[cells]

    detected = {level: np.asarray((counts[levels == level] > 0).sum(axis=0)).ravel() for level in by_level}
    eligible = (sum(detected.values()) >= min_cells) & np.all([d > 0 for d in detected.values()], axis=0)
    normalised_mean = np.asarray((sp.diags(1.0 / totals) @ counts).mean(axis=0)).ravel()
    ranked = np.flatnonzero(eligible)[np.argsort(-normalised_mean[eligible], kind="stable")]
    genes = np.sort(ranked[:n_genes])
    counts = counts[:, genes]

    has_counts = np.asarray(counts.sum(axis=1)).ravel() > 0
    obs = pd.DataFrame(
        {"size_factor": totals[has_counts] / DEPTH_REF, column: levels[has_counts]},
        index=pd.Index(adata.obs_names[cells][has_counts], name="cell"),
    )
    return counts[has_counts].tocsr(), obs, adata.var_names[genes].to_numpy(), int((~has_counts).sum())


def export(counts: sp.csr_matrix, obs: pd.DataFrame, genes, directory: Path) -> None:
    """The R script's input; counts genes x cells, glmGamPoi's orientation."""
    directory.mkdir(parents=True, exist_ok=True)
    scipy.io.mmwrite(directory / "counts.mtx", counts.T.tocoo(), field="integer")
    obs.reset_index().to_csv(directory / "cells.tsv", sep="\t", index=False)
    pd.DataFrame({"gene": genes}).to_csv(directory / "genes.tsv", sep="\t", index=False)


# --------------------------------------------------------------------------- the two fits


def run_glmgampoi(export_dir: Path, out_dir: Path, column: str, reference: str, rscript: str) -> dict:
    """glmGamPoi's coefficients (genes x coefficients, natural log), overdispersions and timings."""
    command = [rscript, str(R_SCRIPT), str(export_dir), str(out_dir), column, reference]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr.strip()}")
    timing = json.loads((out_dir / "timing.json").read_text())
    return {
        "coefficients": pd.read_csv(out_dir / "coefficients.tsv", sep="\t", index_col="gene"),
        "overdispersion": pd.read_csv(out_dir / "overdispersions.tsv", sep="\t", index_col="gene")["overdispersion"],
        "timing": {**timing, "rscript_wall_seconds": wall},
    }


def fit_scnbvi(counts: sp.csr_matrix, obs: pd.DataFrame, design_column: str, reference: str) -> dict:
    """The single place where scnbvi is fitted for this comparison.

    Input: cells x genes counts, ``obs`` with ``size_factor`` (s_i / s_ref) and the design
    column, whose ``reference`` level is the baseline.

    Must return a dict with
    - ``log_fold_changes``: DataFrame, genes (in the order of ``counts``) x non-reference levels
      (columns named by level), each level's per-gene effect vs ``reference``, natural-log scale;
    - ``alpha``: per-gene dispersion alpha (Var = mu + mu^2 / alpha), array in gene order;
    - ``seconds``: wall seconds of the fit (model build, compilation and optimisation).

    Uses the design API (``scnbvi.design.build_design`` and ``fit(..., design=...)``) with
    per-gene dispersion, and no gene-length offset (glmGamPoi has none; it would only move the
    intercept); estimates are the means of q. The model's per-cell effects can absorb a
    shift shared by all genes of a level, so its fold changes may differ from glmGamPoi's by a
    constant per level: the comparison is by rank, and reports the median difference.
    """
    from scnbvi.design import build_design, coefficient_name
    from scnbvi.inference import InferenceSettings, fit
    from scnbvi.posterior import point_estimate

    design = build_design(obs, categorical=[design_column], reference={design_column: reference})
    _, levels = design.factors[design_column]
    start = time.perf_counter()
    model, result = fit(
        counts, np.log(obs["size_factor"].to_numpy()), np.zeros(counts.shape[1]), InferenceSettings(),
        backend="jax", gene_dispersion=True, design=design,
    )
    seconds = time.perf_counter() - start
    estimate = point_estimate(model, result)
    columns = [design.names.index(coefficient_name(design_column, level)) for level in levels]
    return {
        "log_fold_changes": pd.DataFrame(estimate["beta"][:, columns], columns=list(levels)),
        "alpha": np.asarray(estimate["alpha"]),
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- report


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def spread(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.min():.3g} / {np.median(values):.3g} / {values.max():.3g}"


def levels_of(glm, column) -> dict[str, str]:
    """Non-reference level -> its glmGamPoi coefficient column (``column[level]``)."""
    return {name[len(column) + 1 : -1]: name for name in glm["coefficients"].columns if name != "Intercept"}


def reference_tables(obs, column, reference, n_genes, dropped, seed, glm) -> list[str]:
    """What the slice is and what glmGamPoi made of it; needs no scnbvi fit."""
    depth = obs["size_factor"] * DEPTH_REF
    slice_rows = [[level, f"{(obs[column] == level).sum():,}", f"{depth[obs[column] == level].median():,.0f}"]
                  for level in [reference, *levels_of(glm, column)]]
    slice_rows.append(["all", f"{len(obs):,}", f"{depth.median():,.0f}"])
    summary = (f"Slice: {len(obs):,} cells x {n_genes:,} genes (seed {seed}; {dropped} sampled cells without "
               "counts in these genes dropped).")
    theta = glm["overdispersion"]
    fit_rows = [[f"{name} (natural log)", spread(values)] for name, values in glm["coefficients"].items()]
    fit_rows += [
        ["overdispersion theta", spread(theta)],
        ["genes with theta < 1e-6 (Poisson-like)", f"{int((theta < 1e-6).sum())}"],
        ["glm_gp seconds", f"{glm['timing']['glm_gp_seconds']:.1f}"],
        ["Rscript seconds (script / wall incl. R start)",
         f"{glm['timing']['total_seconds']:.1f} / {glm['timing']['rscript_wall_seconds']:.1f}"],
    ]
    versions = f"glmGamPoi {glm['timing']['glmGamPoi']} (R {glm['timing']['R']})"
    return [
        summary,
        markdown_table([f"{column} (reference: {reference})", "cells", "median total count"], slice_rows),
        markdown_table([versions, "min / median / max"], fit_rows),
    ]


def comparison_table(column, glm, scnbvi, mean_count, min_mean) -> str:
    """Rank agreement of log2 fold changes per level and of dispersions, and the time ratio."""
    kept = mean_count >= min_mean
    rows = []
    for level, name in levels_of(glm, column).items():
        ours = scnbvi["log_fold_changes"][level].to_numpy()[kept] / np.log(2)
        theirs = glm["coefficients"][name].to_numpy()[kept] / np.log(2)
        rows.append([f"log2FC {level}", f"{kept.sum():,}", f"{spearmanr(ours, theirs).statistic:.3f}",
                     f"{np.median(ours - theirs):+.3f}"])
    theta = glm["overdispersion"].to_numpy()
    usable = kept & (theta > 0)
    ours, theirs = np.log(scnbvi["alpha"][usable]), -np.log(theta[usable])
    rows.append(["log dispersion (alpha vs 1/theta)", f"{usable.sum():,}", f"{spearmanr(ours, theirs).statistic:.3f}",
                 f"{np.median(ours - theirs):+.3f}"])
    seconds = glm["timing"]["glm_gp_seconds"]
    rows.append(["seconds scnbvi / glm_gp", "", f"{scnbvi['seconds']:.1f} / {seconds:.1f}",
                 f"ratio {scnbvi['seconds'] / seconds:.2f}"])
    header = [f"genes with mean count >= {min_mean}", "genes", "Spearman", "median scnbvi - glmGamPoi"]
    return markdown_table(header, rows)


def plot(path: Path, column, glm, scnbvi, mean_count, min_mean) -> None:
    """scnbvi against glmGamPoi per level and for dispersions; without scnbvi, glmGamPoi's
    estimates against mean count, so the reference side can be looked at alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = mean_count >= min_mean
    panels = [(glm["coefficients"][name].to_numpy() / np.log(2), f"log2FC {name}",
               None if scnbvi is None else scnbvi["log_fold_changes"][level].to_numpy() / np.log(2), False)
              for level, name in levels_of(glm, column).items()]
    panels.append((1.0 / glm["overdispersion"].to_numpy(), "dispersion 1/theta",
                   None if scnbvi is None else scnbvi["alpha"], True))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    for axis, (theirs, label, ours, log_scale) in zip(axes[0], panels):
        finite = kept & np.isfinite(theirs)
        if ours is None:
            axis.scatter(mean_count[finite], theirs[finite], s=3, alpha=0.4)
            axis.set(xscale="log", xlabel="mean count", ylabel=f"glmGamPoi {label}")
        else:
            axis.scatter(theirs[finite], ours[finite], s=3, alpha=0.4)
            low, high = np.nanmin([theirs[finite], ours[finite]]), np.nanmax([theirs[finite], ours[finite]])
            axis.plot([low, high], [low, high], color="grey", lw=0.8)
            axis.set(xlabel=f"glmGamPoi {label}", ylabel=f"scnbvi {label.replace('1/theta', 'alpha')}")
            if log_scale:
                axis.set_xscale("log")
        if log_scale:
            axis.set_yscale("log")
    figure.suptitle(f"{kept.sum():,} genes with mean count >= {min_mean}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "microglia_20k.h5ad")
    parser.add_argument("--design-column", default="study_inferred")
    parser.add_argument("--reference", default="S2_droplet", help="reference level of the design column")
    parser.add_argument("--n-cells", type=int, default=3000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--min-cells", type=int, default=10, help="cells a gene must be detected in")
    parser.add_argument("--min-mean", type=float, default=0.1, help="mean count of the genes compared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmark" / "glmgampoi")
    parser.add_argument("--rscript", default="Rscript")
    parser.add_argument("--reference-only", action="store_true", help="run and report the glmGamPoi side alone")
    args = parser.parse_args()

    counts, obs, genes, dropped = real_slice(args.data, args.design_column, args.n_cells, args.n_genes,
                                             args.min_cells, args.seed)
    export(counts, obs, genes, args.out / "export")
    glm = run_glmgampoi(args.out / "export", args.out / "glmgampoi", args.design_column, args.reference, args.rscript)
    if list(glm["coefficients"].index) != list(genes):
        raise SystemExit("glmGamPoi's genes do not match the export")
    scnbvi = None if args.reference_only else fit_scnbvi(counts, obs, args.design_column, args.reference)

    mean_count = np.asarray(counts.mean(axis=0)).ravel()
    plot(args.out / "comparison.png", args.design_column, glm, scnbvi, mean_count, args.min_mean)
    sections = reference_tables(obs, args.design_column, args.reference, len(genes), dropped, args.seed, glm)
    if scnbvi is not None:
        sections.append(comparison_table(args.design_column, glm, scnbvi, mean_count, args.min_mean))
    report = "\n\n".join(sections) + "\n"
    (args.out / "comparison.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
