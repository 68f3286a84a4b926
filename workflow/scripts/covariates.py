from _runner import run


def main(snakemake):
    import anndata as ad
    import pandas as pd

    from scnbvi.design import design_from_config, write_design
    from scnbvi.offsets import covariate_tables, write_covariates

    # The cells' totals over all genes are in the selection's obs: the counts themselves are not needed.
    adata = ad.read_h5ad(snakemake.input.selection)
    obs = adata.obs
    for table in snakemake.input.cell_cycle:
        obs = obs.join(pd.read_csv(table, sep="\t", index_col="cell", dtype={"cell": str}))
    cells, genes = covariate_tables(adata, snakemake.params.settings)
    design = design_from_config(obs, snakemake.params.design, snakemake.params.contrasts)
    cells = cells.join(design.table(adata.obs_names))
    write_covariates(cells, genes, snakemake.output.cells, snakemake.output.genes)
    write_design(design, snakemake.output.design)


run(snakemake, main)
