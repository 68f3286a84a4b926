from _counts import selected_counts
from _runner import run


def main(snakemake):
    from scnbvi.design import read_design
    from scnbvi.inference import InferenceSettings, fit
    from scnbvi.inference.checkpoint import remove_checkpoint
    from scnbvi.offsets import aligned_covariates
    from scnbvi.outputs import atomic_output, code_version, write_json, write_table
    from scnbvi.posterior import sample_posterior
    from scnbvi.trace import write_trace

    # The settings that only say how the fit runs are not params (see common.smk): from the config.
    run_only = snakemake.config["datasets"][snakemake.wildcards.dataset]["inference"]
    settings = InferenceSettings.from_config(
        {**snakemake.params.inference, **{key: run_only[key] for key in snakemake.params.run_only}}
    )
    gene_dispersion = snakemake.params.model["gene_dispersion"]
    with selected_counts(snakemake) as (selection, counts):
        cells, genes = aligned_covariates(snakemake.input.cells, snakemake.input.genes, selection)
        design = read_design(snakemake.input.design, cells)
        model, result = fit(
            counts,
            cells["log_offset"].to_numpy(),
            genes["log_offset"].to_numpy(),
            settings,
            backend=snakemake.params.backend,
            gene_dispersion=gene_dispersion,
            cell_names=selection.obs_names,
            gene_names=selection.var_names,
            design=design if design.n_coefficients else None,
            checkpoint_path=snakemake.params.checkpoint,
        )
    max_cells = snakemake.params.inference["cell_draws_max_cells"]
    idata, cell_moments = sample_posterior(
        model, result, settings.draws, settings.seed, max_cells=max_cells,
        local_draws=snakemake.params.inference["local_draws"],
        attrs={"gene_dispersion": int(gene_dispersion), "cell_draws_max_cells": max_cells},
    )
    write_table(result.elbo_table(), snakemake.output.elbo, index=False)
    write_json({**result.statistics(), **code_version()}, snakemake.output.stats)
    write_table(cell_moments.join(cells), snakemake.output.cells)
    with atomic_output(snakemake.output.trace) as path:
        write_trace(idata, path)
    # Only now: had a write above failed, the rerun would resume from the finished fit.
    remove_checkpoint(snakemake.params.checkpoint)


run(snakemake, main)
