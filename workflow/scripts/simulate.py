from _runner import run


def main(snakemake):
    from scnbvi.data import write_counts
    from scnbvi.simulate import SimulationTruth, simulate_counts

    settings = snakemake.params.settings
    truth = SimulationTruth(condition_effect_sd=settings["condition_effect_sd"], batch_effect_sd=settings["batch_effect_sd"],
                            donors=settings["donors"], donor_effect_sd=settings["donor_effect_sd"])
    adata = simulate_counts(settings["n_cells"], settings["n_genes"], settings["seed"], truth)
    write_counts(adata, snakemake.output[0])


run(snakemake, main)
