from _runner import run


def main(snakemake):
    import json

    import pandas as pd

    from scnbvi.outputs import atomic_output
    from scnbvi.plotting import plot_elbo

    elbo = pd.read_csv(snakemake.input.elbo, sep="\t")
    stats = json.loads(open(snakemake.input.stats).read())
    with atomic_output(snakemake.output[0]) as path:
        plot_elbo(
            elbo,
            path,
            converged=stats["converged"],
            stop_reason=stats["stop_reason"],
            title=f"{snakemake.wildcards.dataset}: {stats['stop_reason']}",
        )


run(snakemake, main)
