from _runner import run


def main(snakemake):
    import anndata as ad
    import arviz as az

    from scnbvi.outputs import atomic_output
    from scnbvi.summary import gene_table, posterior_summary

    idata = az.from_netcdf(snakemake.input.trace)
    adata = ad.read_h5ad(snakemake.input.h5ad)
    with atomic_output(snakemake.output.summary) as path:
        posterior_summary(idata).to_csv(path)
    with atomic_output(snakemake.output.genes) as path:
        gene_table(idata, adata.X, adata.var_names).to_csv(path, sep="\t")


run(snakemake, main)
