from _runner import run


def main(snakemake):
    import logging

    import anndata as ad

    from scnbvi import covariates

    settings = snakemake.params.settings
    adata = ad.read_h5ad(snakemake.input.h5ad)
    lengths = settings["gene_length"]
    source = "covariates.gene_length"
    if lengths["source"] == "table":
        gene_length = covariates.gene_lengths_from_table(lengths["path"], adata.var_names)
    elif lengths["source"] == "gtf":
        gene_length = covariates.gene_lengths_from_gtf(lengths["path"], adata.var_names, lengths["attribute"])
    elif lengths["source"] == "var":
        gene_length = covariates.gene_lengths_from_var(adata, lengths["column"], source)
    else:
        gene_length = covariates.impute_gene_lengths(adata.n_vars, settings["seed"])
    depth_settings = settings["depth"]
    depth, n_imputed = covariates.sequencing_depth(
        adata,
        source=depth_settings["source"],
        column=depth_settings["column"],
        constant=depth_settings["constant"],
        seed=settings["seed"],
        per_cell=depth_settings["per_cell"],
    )
    logging.getLogger("scnbvi").info("depth: %d of %d cells imputed", n_imputed, adata.n_obs)
    cell_log_offset, gene_log_offset = covariates.log_offsets(
        depth,
        gene_length,
        per_cell=depth_settings["per_cell"],
        depth_ref=settings["depth_ref"],
        length_ref=settings["length_ref"],
    )
    covariates.write_covariates(
        snakemake.output.cells,
        snakemake.output.genes,
        obs_names=adata.obs_names,
        depth=depth,
        cell_log_offset=cell_log_offset,
        var_names=adata.var_names,
        gene_length=gene_length,
        gene_log_offset=gene_log_offset,
    )


run(snakemake, main)
