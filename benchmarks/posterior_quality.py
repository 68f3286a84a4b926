"""Posterior quality of the ADVI fit on simulated data, with the figures in the README.

Usage, from the repository root:

    python benchmarks/posterior_quality.py --parts calibration,stability --out posterior_quality.md

calibration: 90 % interval coverage of the truth over simulated data sets (seeds 1..N,
             2,000 cells x 300 genes, per-gene dispersion around alpha 2 with log sd 0.3),
             per quantity, pooled over genes or cells and data sets.
stability:   sigma_gene and sigma_cond of one simulated data set (2,000 x 300, truth sd 0.92
             realised) across fit seeds, learning rates and tolerances: the spread of their
             posterior means should be far below their posterior sd.
nuts:        the check_nuts comparison with its defaults (300 cells x 80 genes, 4 chains) on
             real droplet cells (S2_droplet of microglia_20k.h5ad, depth over all genes);
             --nuts-tune and --nuts-draws change the NUTS run's length (per chain).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
from benchmark import run_parts, table  # the sibling script's helpers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DATA = REPO.parent / "shared" / "data"

SHAPE = (2000, 300)


def simulated(seed: int, n_cells: int, n_genes: int):
    from scnbvi.simulate import SimulationTruth, simulate_counts

    return simulate_counts(n_cells, n_genes, seed=seed,
                           truth=SimulationTruth(sigma_gene=1.0, sigma_cond=0.3, alpha=2.0, log_alpha_sd=0.3))


def fit_posterior(adata, draws: int = 1000, **settings):
    """The workflow's fit (jax engine, defaults unless given) with every cell's draws."""
    from scnbvi.inference import InferenceSettings, fit
    from scnbvi.posterior import draw_posterior

    settings = InferenceSettings(draws=draws, log_every_seconds=1e9, **settings)
    model, result = fit(adata.X, np.log(adata.obs["depth"].to_numpy() / 1e5),
                        np.log(adata.var["length"].to_numpy() / 2000), settings, backend="jax",
                        cell_names=adata.obs_names, gene_names=adata.var_names)
    return result, draw_posterior(model, result, settings.draws, settings.seed).posterior


def calibration(n_datasets: int = 20) -> str:
    from scnbvi.calibration import coverage_hits

    pooled: dict[str, list] = {}
    for seed in range(1, n_datasets + 1):
        adata = simulated(seed, *SHAPE)
        _, posterior = fit_posterior(adata)
        for name, hits in coverage_hits(posterior, adata).items():
            pooled.setdefault(name, []).append(hits)
    rows = [[name, f"{np.mean(np.concatenate(hits)):.3f}", str(sum(len(h) for h in hits))]
            for name, hits in pooled.items()]
    return f"{n_datasets} data sets of {SHAPE[0]} x {SHAPE[1]}\n\n" + table(
        ["quantity", "90 % interval coverage", "checks"], rows)


def stability() -> str:
    adata = simulated(1, *SHAPE)
    realised = adata.var["true_gene_effect"].std()
    variants = {
        "defaults (seed 0, learning rate 0.05, tolerance 1e-4)": {},
        "seed 1": {"seed": 1},
        "seed 2": {"seed": 2},
        "learning rate 0.01": {"learning_rate": 0.01},
        "learning rate 0.02": {"learning_rate": 0.02},
        "tolerance 1e-5": {"tolerance": 1e-5},
        "init prior": {"init": "prior"},
    }
    rows, means = [], []
    for label, settings in variants.items():
        result, posterior = fit_posterior(adata, draws=1000, **settings)
        sigma = posterior["sigma_gene"].values.ravel()
        means.append(sigma.mean())
        rows.append([label, f"{sigma.mean():.4f}", f"{sigma.std():.4f}",
                     f"{posterior['sigma_cond'].values.mean():.4f}", str(result.steps)])
    spread = (max(means) - min(means)) / np.mean(means)
    return (f"realised sd of the true gene effects {realised:.3f}; sigma_gene spread (max - min) / mean "
            f"{100 * spread:.2f} %\n\n"
            + table(["fit", "sigma_gene mean", "sigma_gene sd", "sigma_cond mean", "steps"], rows))


def nuts(tune: int, draws: int) -> str:
    from scnbvi.data import read_counts
    from scnbvi.inference import InferenceSettings
    from scnbvi.nuts_check import NutsSettings, check_nuts
    from scnbvi.qc import slice_counts

    microglia = read_counts(DATA / "microglia_20k.h5ad")
    microglia.obs["depth"] = np.asarray(microglia.X.sum(axis=1), dtype=np.float64).ravel()
    droplet = slice_counts(microglia, obs_filters={"study_inferred": ["S2_droplet"]}, drop_zero_cells=True)
    comparison, record = check_nuts(droplet.X, np.log(droplet.obs["depth"].to_numpy() / 1e5), np.zeros(droplet.n_vars),
                               list(droplet.obs_names), list(droplet.var_names), None,
                               nuts=NutsSettings(tune=tune, draws=draws),
                               inference=InferenceSettings(log_every_seconds=1e9), backend="jax")
    columns = ["elements", "correlation", "mean_difference_in_sd", "sd_ratio", "nuts_mass_in_advi_interval", "missed",
               "rhat_max", "ess_bulk_min"]
    rows = [[name, *(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns)]
            for name, row in comparison.iterrows()]
    facts = {k: v for k, v in record.items() if not isinstance(v, (dict, list))}
    return f"{facts}\n\n" + table(["quantity", *columns], rows)


PARTS = {"calibration": calibration, "stability": stability, "nuts": nuts}

if __name__ == "__main__":
    from scnbvi.nuts_check import NutsSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--nuts-tune", type=int, default=NutsSettings.tune)
    parser.add_argument("--nuts-draws", type=int, default=NutsSettings.draws)
    args = parser.parse_args()
    PARTS["nuts"] = partial(nuts, args.nuts_tune, args.nuts_draws)
    run_parts(args.parts, PARTS, args.out, [], label="## {}")
