from _counts import selected_counts
from _runner import run


def main(snakemake):
    import logging

    import pandas as pd

    from scnbvi.design import read_design
    from scnbvi.offsets import aligned_covariates
    from scnbvi.outputs import write_table
    from scnbvi.pseudobulk import agreement, pseudobulk_counts, pydeseq2_table

    with selected_counts(snakemake) as (selection, counts):
        cells, _ = aligned_covariates(snakemake.input.cells, snakemake.input.genes, selection)
        design = read_design(snakemake.input.design, cells)
        contrast = tuple(str(part) for part in snakemake.params.contrast)
        summed, groups = pseudobulk_counts(counts, design, contrast[0], selection.var_names)
    table = pydeseq2_table(summed, groups, contrast, paired=not design.is_sample_level(contrast[0]))
    ours = pd.read_csv(snakemake.input.table, sep="\t", index_col="gene")
    agreed = agreement(ours, table, snakemake.params.lfsr_level)
    logging.getLogger("scnbvi.progress").info("%s pseudobulk (PyDESeq2, %d groups) against scnbvi: %s",
                                              snakemake.wildcards.contrast, len(groups), agreed)
    write_table(table, snakemake.output.table)
    write_table(pd.DataFrame([agreed]).set_index("genes_compared"), snakemake.output.agreement)


run(snakemake, main)
