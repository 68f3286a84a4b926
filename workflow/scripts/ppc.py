from _runner import run, stage_logger


def main(snakemake):
    import logging

    from scnbvi.data import SelectedCounts
    from scnbvi.design import read_design
    from scnbvi.offsets import aligned_covariates
    from scnbvi.outputs import atomic_output, write_json, write_table
    from scnbvi.plotting import plot_ppc_library_size, plot_ppc_mean_variance, plot_ppc_zero_fraction
    from scnbvi.ppc import (
        BAND,
        cell_positions,
        centred_covariates,
        check,
        library_size_histogram,
        posterior_draws,
        select_cells,
        typical_dispersion,
    )
    from scnbvi.trace import read_trace

    stage = stage_logger("posterior predictive check")
    settings = snakemake.params.settings
    # Every fitted cell's covariates (the design is centred over them all), the checked cells' counts only:
    # the selection is read once, for both.
    with SelectedCounts(snakemake.input.h5ad, snakemake.input.selection, **snakemake.params.reading) as reader:
        selection = reader.selection
        cells, genes = aligned_covariates(snakemake.input.cells, snakemake.input.genes, selection)
        design = read_design(snakemake.input.design, cells)
        idata = read_trace(snakemake.input.trace)
        checked = select_cells(idata["posterior"]["cell"].values, settings["cells"], settings["seed"])
        rows = cell_positions(checked, selection.obs_names, snakemake.input.trace)
        counts = reader.anndata(cells=checked).X
    draws = posterior_draws(idata, checked, settings["draws"], settings["seed"])
    covariates = centred_covariates(design, draws.coefficients)[rows] if draws.beta is not None else None
    stage(f"read the counts, the design and {draws.n_draws} draws of {len(checked)} cells")
    result = check(
        counts,
        draws,
        cells["log_offset"].to_numpy()[rows],
        genes["log_offset"].to_numpy(),
        covariates,
        cell_names=checked,
        gene_names=selection.var_names,
        seed=settings["seed"],
    )
    write_table(result.genes, snakemake.output.genes)
    write_table(result.cells, snakemake.output.cells)
    write_json(result.verdict, snakemake.output.verdict)
    stage("tables written")
    title = f"{snakemake.wildcards.dataset}: {len(result.cells)} cells, {draws.n_draws} draws"
    with atomic_output(snakemake.output.zero_fraction) as path:
        plot_ppc_zero_fraction(result.genes, path, title=title, band=BAND)
    with atomic_output(snakemake.output.mean_variance) as path:
        plot_ppc_mean_variance(result.genes, path, alpha=typical_dispersion(draws), title=title)
    histogram = library_size_histogram(result.cells["library_size_observed"].to_numpy(), result.library_sizes)
    with atomic_output(snakemake.output.library_size) as path:
        plot_ppc_library_size(histogram, path, title=title, band=BAND)
    stage("plots written")
    logging.getLogger("scnbvi").info("posterior predictive check: %s", result.verdict["verdict"])


run(snakemake, main)
