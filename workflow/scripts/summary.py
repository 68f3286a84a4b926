from _runner import run, stage_logger


def main(snakemake):
    import arviz as az

    from scnbvi.data import read_selected_counts, symbols_from_var
    from scnbvi.outputs import write_table
    from scnbvi.summary import gene_table, posterior_summary

    done = stage_logger("summary")  # silent for minutes on large data otherwise
    idata = az.from_netcdf(snakemake.input.trace)
    adata = read_selected_counts(snakemake.input.h5ad, snakemake.input.selection, **snakemake.params.reading)
    done("read the trace and the counts")
    write_table(posterior_summary(idata), snakemake.output.summary, sep=",")
    done(f"wrote {snakemake.output.summary}")
    symbols = symbols_from_var(adata.var, snakemake.params.gene_symbols)
    write_table(gene_table(idata, adata.X, adata.var_names, symbols), snakemake.output.genes)
    done(f"wrote {snakemake.output.genes}")


run(snakemake, main)
