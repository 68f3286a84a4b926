from _runner import run, stage_logger


def main(snakemake):

    import anndata as ad

    from scnbvi.data import symbols_from_var
    from scnbvi.outputs import write_table
    from scnbvi.report_tables import SHOWN_ROWS, write_html_table
    from scnbvi.summary import gene_table, posterior_summary
    from scnbvi.trace import read_trace

    done = stage_logger("summary")  # silent for minutes on large data otherwise
    idata = read_trace(snakemake.input.trace)
    # The genes' totals are in the selection's var: no counts to read.
    selection = ad.read_h5ad(snakemake.input.selection)
    done("read the trace and the selection")
    write_table(posterior_summary(idata), snakemake.output.summary, sep=",")
    done(f"wrote {snakemake.output.summary}")
    symbols = symbols_from_var(selection.var, snakemake.params.gene_symbols)
    genes = gene_table(idata, selection.var[["total_counts", "n_cells_expressed"]], symbols)
    write_table(genes, snakemake.output.genes)
    # The report's page, to browse: the most expressed genes; genes.tsv holds every gene.
    shown = genes.sort_values("log_expression_mean", ascending=False, kind="stable").head(SHOWN_ROWS)
    write_html_table(shown, f"{snakemake.wildcards.dataset}: per-gene results", snakemake.output.genes_html,
                     index_label="gene", note=f"{len(shown):,} of {len(genes):,} genes, most expressed first; "
                     "all in genes.tsv.")
    done(f"wrote {snakemake.output.genes}")


run(snakemake, main)
