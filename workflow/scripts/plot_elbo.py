from _runner import run

# Load-time QC quantity -> the `load` setting that acts on it.
QC_ACTIONS = {"all_zero_cells": "zero_cells", "all_zero_genes": "zero_genes", "duplicate_cells": "duplicate_cells"}


def qc_rows(qc: dict) -> list[dict]:
    """qc.json as rows a person reads: each quantity before and after load, and what load did."""
    rows = [
        {"quantity": name, "before load": qc["before"].get(name, ""), "after load": qc["after"].get(name, ""),
         "load action": qc["actions"].get(QC_ACTIONS.get(name), "")}
        for name in dict.fromkeys([*qc["before"], *qc["after"]])
    ]
    rows += [
        {"quantity": f"{axis} names made unique", "before load": "", "after load": renamed["count"],
         "load action": qc["actions"].get("duplicate_names", "")}
        for axis, renamed in qc.get("renamed", {}).items()
    ]
    return rows


def fit_rows(stats: dict, n_cells: int, n_genes: int) -> list[dict]:
    """fit_stats.json's plain values, after the size of the data and the ELBO per observation."""
    per_observation = stats.get("final_eval_elbo")
    if per_observation is not None:
        per_observation /= n_cells * n_genes
    first = {"cells": n_cells, "genes": n_genes, "final fixed-cells ELBO per observation": per_observation}
    values = {**first, **{key: value for key, value in stats.items() if not isinstance(value, (dict, list))}}
    return [{"statistic": key, "value": "" if value is None else f"{value:.6g}" if isinstance(value, float) else value}
            for key, value in values.items()]


def main(snakemake):
    import json

    import pandas as pd

    from scnbvi.outputs import atomic_output
    from scnbvi.plotting import plot_elbo
    from scnbvi.report_tables import write_html_table

    dataset = snakemake.wildcards.dataset
    elbo = pd.read_csv(snakemake.input.elbo, sep="\t")
    stats = json.loads(open(snakemake.input.stats).read())
    qc = json.loads(open(snakemake.input.qc).read())
    # The fitted cells and genes: one row each in the covariate tables.
    n_cells = len(pd.read_csv(snakemake.input.cells, sep="\t", usecols=[0]))
    n_genes = len(pd.read_csv(snakemake.input.genes, sep="\t", usecols=[0]))
    with atomic_output(snakemake.output.plot) as path:
        plot_elbo(elbo, path, stats=stats, n_observations=n_cells * n_genes,
                  title=f"{dataset} ({n_cells:,} cells x {n_genes:,} genes): {stats['stop_reason']}")
    write_html_table(pd.DataFrame(qc_rows(qc)), f"{dataset}: quality report of the input (qc.json)",
                     snakemake.output.qc)
    write_html_table(pd.DataFrame(fit_rows(stats, n_cells, n_genes)), f"{dataset}: how the fit went (fit_stats.json)",
                     snakemake.output.fit)


run(snakemake, main)
