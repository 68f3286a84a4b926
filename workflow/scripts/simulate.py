from _runner import run


def main(snakemake):
    from scnbvi.data import write_counts
    from scnbvi.simulate import simulate_counts

    settings = snakemake.params.settings
    adata = simulate_counts(settings["n_cells"], settings["n_genes"], settings["seed"])
    write_counts(adata, snakemake.output[0])


run(snakemake, main)
