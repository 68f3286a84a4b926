from _counts import selected_counts
from _runner import run


def main(snakemake):
    import logging

    from scnbvi.data import symbols_from_var
    from scnbvi.de import contrast_table
    from scnbvi.design import read_design
    from scnbvi.offsets import aligned_covariates
    from scnbvi.outputs import atomic_output, write_table
    from scnbvi.plotting import plot_contrast
    from scnbvi.report_tables import SHOWN_ROWS, write_html_table
    from scnbvi.trace import read_trace

    settings = snakemake.params.settings
    with selected_counts(snakemake) as (selection, counts):
        cells, genes = aligned_covariates(snakemake.input.cells, snakemake.input.genes, selection)
        design = read_design(snakemake.input.design, cells)
        contrast = tuple(str(part) for part in snakemake.params.contrast)
        result = contrast_table(
            read_trace(snakemake.input.trace),
            design,
            contrast,
            counts,
            cells["depth"].to_numpy(),
            lfc_threshold=settings["lfc_threshold"],
            credible_mass=settings["credible_mass"],
            centre=settings["centre"],
            symbols=symbols_from_var(selection.var, snakemake.params.gene_symbols),
        )
    # The files' name: the user's (contrasts as a mapping) or made from the parts.
    name = snakemake.wildcards.contrast
    logging.getLogger("scnbvi.progress").info("%s (%s %s vs %s): %s", name, *contrast, result.describe())
    write_table(result.table, snakemake.output.table)
    title = (f"{snakemake.wildcards.dataset} {name}: {contrast[0]} {contrast[1]} vs {contrast[2]}\n"
             f"replicates: {result.replicates}")
    with atomic_output(snakemake.output.ma) as ma, atomic_output(snakemake.output.volcano) as volcano:
        plot_contrast(result.table, ma, volcano, title=title, lfsr_level=settings["lfsr_level"],
                      lfc_threshold=settings["lfc_threshold"])
    # The report shows the top of the table, to browse; the .tsv holds every gene.
    shown = result.table.head(SHOWN_ROWS)
    write_html_table(shown, title.splitlines()[0], snakemake.output.html, index_label="gene",
                     note=f"{len(shown):,} of {len(result.table):,} genes, by lfsr; all in {name}.tsv.")


run(snakemake, main)
