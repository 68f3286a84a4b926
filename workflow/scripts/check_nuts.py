from _counts import selected_counts
from _runner import run


def main(snakemake):
    from scnbvi.design import read_design
    from scnbvi.inference import InferenceSettings
    from scnbvi.nuts_check import INTERVAL_MASS, NutsSettings, check_nuts
    from scnbvi.offsets import aligned_covariates
    from scnbvi.outputs import atomic_output, code_version, write_json, write_table
    from scnbvi.plotting import plot_nuts_check

    with selected_counts(snakemake) as (selection, counts):
        cells, genes = aligned_covariates(snakemake.input.cells, snakemake.input.genes, selection)
        design = read_design(snakemake.input.design, cells)
        table, record = check_nuts(
            counts,
            cells["log_offset"].to_numpy(),
            genes["log_offset"].to_numpy(),
            list(selection.obs_names),
            list(selection.var_names),
            design if design.n_coefficients else None,
            nuts=NutsSettings.from_config(snakemake.params.nuts),
            inference=InferenceSettings.from_config(snakemake.params.inference),
            backend=snakemake.params.backend,
            gene_dispersion=snakemake.params.model["gene_dispersion"],
            cores=snakemake.threads,
        )
    write_table(table, snakemake.output.table)
    write_json({**record, **code_version()}, snakemake.output.record)
    title = (f"{snakemake.wildcards.dataset}: ADVI vs NUTS on {record['cells']} cells x {record['genes']} genes "
             f"(NUTS max r-hat {record['rhat_max']:.3f}, min bulk ESS {record['ess_bulk_min']:.0f}, "
             f"{record['divergences']} divergences)")
    with atomic_output(snakemake.output.plot) as path:
        plot_nuts_check(table, path, title=title, mass=INTERVAL_MASS)


run(snakemake, main)
