from _runner import run


def main(snakemake):
    import logging

    import numpy as np

    from scnbvi.data import write_selection
    from scnbvi.qc import gene_counts, loaded_counts, slice_counts

    settings = snakemake.params.settings
    adata = loaded_counts(snakemake.input.h5ad, snakemake.params.load)
    # Each cell's library size over all genes, before genes are selected: its sequencing depth.
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
    sliced = slice_counts(
        adata,
        cells_method=settings["cells"]["method"],
        n_cells=settings["cells"]["n"],
        genes_method=settings["genes"]["method"],
        n_genes=settings["genes"]["n"],
        obs_filters=settings["obs_filters"],
        drop_zero_cells=settings["drop_zero_cells"],
        drop_zero_genes=settings["drop_zero_genes"],
        seed=settings["seed"],
        source="slice",
    )
    logging.getLogger("scnbvi").info("sliced %s -> %s", adata.shape, sliced.shape)
    for column, values in gene_counts(sliced.X, sliced.var_names).items():
        sliced.var[column] = values.to_numpy()
    write_selection(sliced, snakemake.output[0])


run(snakemake, main)
