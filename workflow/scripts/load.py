from _runner import run


def main(snakemake):
    import json
    import logging

    import numpy as np

    from scnbvi.data import checked_count_blocks, write_annotations
    from scnbvi.outputs import code_version, write_json
    from scnbvi.qc import count_statistics, loaded_annotations, qc_masks, report_of

    settings = dict(snakemake.params.settings)
    duplicate_names, layer, gene_symbols = (settings.pop(key) for key in ("duplicate_names", "layer", "gene_symbols"))
    # One pass over the counts, a block of cells at a time: their statistics, never the whole matrix.
    with checked_count_blocks(snakemake.input[0], duplicate_names=duplicate_names, layer=layer,
                              gene_symbols=gene_symbols) as counts:
        statistics = count_statistics(counts.blocks, len(counts.var))
    keep_cells, keep_genes = qc_masks(statistics, **settings)
    every_cell, every_gene = np.ones_like(keep_cells), np.ones_like(keep_genes)
    report = {"input": str(snakemake.input[0]), "code_version": code_version(), "renamed": counts.renamed,
              "before": report_of(statistics, every_cell, every_gene), "actions": snakemake.params.settings,
              "after": report_of(statistics, keep_cells, keep_genes)}
    logging.getLogger("scnbvi").info("quality report: %s", json.dumps(report))
    obs, var = loaded_annotations(counts.obs, counts.var, statistics, keep_cells, keep_genes)
    # Text columns stay text: the slice's selection of them is then written as if from the input.
    write_annotations(obs, var, statistics.dtype, snakemake.output.loaded, strings_to_categoricals=False)
    write_json(report, snakemake.output.qc)


run(snakemake, main)
