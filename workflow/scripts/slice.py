from _runner import run


def main(snakemake):
    import logging

    import anndata as ad

    from scnbvi.data import SELECTION_KEY, SelectedCounts, write_annotations
    from scnbvi.qc import slice_loaded

    settings, reading = snakemake.params.settings, snakemake.params.reading
    loaded = ad.read_h5ad(snakemake.input.loaded)

    def read_rows(positions):
        # The input is opened only when a step needs counts, and read through loaded.h5ad as the fit reads it
        # through the selection.
        with SelectedCounts(snakemake.input.h5ad, snakemake.input.loaded, **reading) as counts:
            yield from counts.blocks(cells=positions)

    obs, var = slice_loaded(
        loaded,
        read_rows,
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
    logging.getLogger("scnbvi").info("sliced %s -> %s", loaded.shape, (len(obs), len(var)))
    write_annotations(obs, var, loaded.uns[SELECTION_KEY]["dtype"], snakemake.output[0])


run(snakemake, main)
