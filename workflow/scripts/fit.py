from _runner import run


def main(snakemake):
    from scnbvi.pipeline import fit_dataset

    fit_dataset(
        counts_path=snakemake.input.h5ad,
        cells_path=snakemake.input.cells,
        genes_path=snakemake.input.genes,
        inference=snakemake.params.inference,
        model=snakemake.params.model,
        backend=snakemake.params.backend,
        trace_path=snakemake.output.trace,
        elbo_path=snakemake.output.elbo,
        stats_path=snakemake.output.stats,
    )


run(snakemake, main)
