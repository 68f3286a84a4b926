"""The lines that close a successful run: how each data set's fit went, read back from its result
files. Standard library only: Snakemake's own process prints them."""

from __future__ import annotations

import json
from pathlib import Path


def run_report(results, datasets) -> list[str]:
    """One line per data set with a fit: converged or not, the predictive check's verdict, where
    the results are. Data sets not fitted yet (a run of other targets) are left out."""
    lines = []
    for dataset in datasets:
        out = Path(results) / dataset
        if not (out / "fit_stats.json").is_file():
            continue
        stats = json.loads((out / "fit_stats.json").read_text())
        fit = (f"fit converged after {stats['steps']} steps" if stats["converged"]
               else f"warning: fit {stats['stop_reason']}, its estimates may be off")
        lines.append(f"scnbvi: {dataset}: {fit}; {predictive_check(out / 'ppc.json')}; results in {out}/")
    return lines


def predictive_check(path: Path) -> str:
    """The verdict of ppc.json, with a warning when a statistic lies outside its band for more genes
    than expected of a model that fits."""
    if not path.is_file():
        return "no predictive check yet"
    check = json.loads(path.read_text())
    line = f"predictive check: {check['verdict']}"
    expected = check["expected_outside_band_if_the_model_fits"]
    statistic, outside = max(check["genes_outside_band"].items(), key=lambda item: item[1])
    if outside > expected:
        line += (f"; warning: {statistic.replace('_', ' ')} outside its band for {100 * outside:.0f} % of genes, "
                 f"past the {100 * expected:.0f} % expected if the model fits (see {path.parent}/ppc_*.png)")
    return line
