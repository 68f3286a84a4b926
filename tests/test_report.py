"""The HTML report, as the Snakemake workflow catalog's CI builds it: a run of the small simulated
preset with one contrast, then ``snakemake --report report.zip`` with the same config file. And
the ELBO plot's reading of the stopping rule, which must agree with the rule itself."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import preset, snakemake, write_config
from scnbvi.inference.plateau import DecayThenStop
from scnbvi.plotting import plateau_checks

WITH_CONTRAST = preset("small_simulated")
WITH_CONTRAST["datasets"]["sim"].update(
    design={"categorical": ["condition"], "reference": {"condition": "control"}},
    contrasts=[["condition", "treated", "control"]],
)
WITH_CONTRAST["datasets"]["sim"]["simulate"]["condition_effect_sd"] = 0.7
CONTRAST = "condition_treated_vs_control"
EXPECTED_ITEMS = {
    "qc.html", "fit_stats.html", "elbo.png", "summary.csv", "genes.tsv", "genes.html",
    f"{CONTRAST}.tsv", f"{CONTRAST}.html", f"{CONTRAST}_ma.png", f"{CONTRAST}_volcano.png",
    "ppc_genes.tsv", "ppc_zero_fraction.png", "ppc_mean_variance.png", "ppc_library_size.png",
}


def replay(elbo: np.ndarray, settings: dict) -> tuple[int, list[int]]:
    """Checks the fit runs before the rule stops it, and the checks at which it decays."""
    rule = DecayThenStop(settings["tolerance"], settings["patience"], settings["learning_rate_decay"],
                         settings["max_decays"])
    taken = []
    for check, value in enumerate(elbo):
        before = rule.decays
        if rule.update(value):
            return check + 1, taken
        if rule.decays > before:
            taken.append(check)
    return len(elbo), taken


def test_elbo_plot_marks_the_decays_the_stopping_rule_takes():
    for seed in range(100):
        rng = np.random.default_rng(seed)
        steps = rng.exponential(rng.choice([1e-3, 1e-1, 10.0]), 40) * rng.choice([-1, 1], p=[0.3, 0.7], size=40)
        elbo = -1000 + np.cumsum(steps)
        settings = {"tolerance": float(rng.choice([1e-5, 1e-4, 1e-2])), "patience": int(rng.integers(1, 4)),
                    "learning_rate_decay": float(rng.choice([0.5, 1.0])), "max_decays": int(rng.integers(0, 4))}
        checks, taken = replay(elbo, settings)
        # elbo.tsv ends at the check that stopped the fit.
        _, decays = plateau_checks(elbo[:checks], **settings)
        assert list(decays) == taken, (seed, settings)


@pytest.mark.slow
def test_report_opens_on_the_workflow_description_and_holds_every_result(workflow_copy):
    config = write_config(workflow_copy, WITH_CONTRAST)
    run = snakemake(workflow_copy, "--configfile", config)
    assert run.returncode == 0, run.stderr[-3000:]

    report = snakemake(workflow_copy, "--report", "report.zip", "--configfile", config)
    assert report.returncode == 0, report.stderr[-3000:]
    with zipfile.ZipFile(workflow_copy / "report.zip") as archive:
        page = archive.read("report/report.html").decode()
        items = {Path(name).name: name for name in archive.namelist() if name.startswith("report/data/")}
        qc = archive.read(items["qc.html"]).decode()
        fit = archive.read(items["fit_stats.html"]).decode()
        de = archive.read(items[f"{CONTRAST}.html"]).decode()
        genes = archive.read(items["genes.html"]).decode()

    assert "scnbvi fits a hierarchical Negative-Binomial model" in page
    assert "Quality control" in page and "Convergence" in page and "Differential expression" in page
    assert "Posterior predictive checks" in page
    assert EXPECTED_ITEMS <= set(items), sorted(items)
    assert "<td>n_cells</td>" in qc and "<td>drop</td>" in qc
    assert "final fixed-cells ELBO per observation" in fit and "converged (elbo rule" in fit
    assert "<th>gene</th>" in de and "<th>lfsr</th>" in de and "<script>" in de
    assert "<th>log_expression_mean</th>" in genes and "40 of 40 genes" in genes
