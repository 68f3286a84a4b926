from _runner import run


def main(snakemake):
    from scnbvi.cell_cycle import cell_cycle_scores, read_gene_list
    from scnbvi.data import read_selected_counts
    from scnbvi.outputs import write_table

    settings = snakemake.params.settings
    s_list, g2m_list = snakemake.input.lists
    scores = cell_cycle_scores(
        read_selected_counts(snakemake.input.h5ad, snakemake.input.selection, **snakemake.params.reading),
        read_gene_list(s_list),
        read_gene_list(g2m_list),
        gene_symbols=settings["gene_symbols"],
        seed=settings["seed"],
        source="cell_cycle",
    )
    write_table(scores, snakemake.output[0])


run(snakemake, main)
