from _runner import run


def main(snakemake):
    import anndata as ad

    from scnbvi.covariates import covariate_tables, write_covariates

    adata = ad.read_h5ad(snakemake.input.h5ad)
    cells, genes = covariate_tables(adata, snakemake.params.settings)
    write_covariates(cells, genes, snakemake.output.cells, snakemake.output.genes)


run(snakemake, main)
