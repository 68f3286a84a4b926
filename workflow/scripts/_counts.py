"""The selected counts of a rule's job, for the scripts that read them as the fit does."""


def selected_counts(snakemake):
    """The job's selection and a store of its counts (``scnbvi.cell_rows.selected_counts``), as a context.
    Whether the counts are held or streamed (``inference.stream_above_gb``) changes how they are read, not
    what they are, so it comes from the config rather than the rule's params (a change reruns nothing)."""
    from scnbvi.cell_rows import selected_counts

    stream_above_gb = snakemake.config["datasets"][snakemake.wildcards.dataset]["inference"]["stream_above_gb"]
    return selected_counts(snakemake.input.h5ad, snakemake.input.selection, stream_above_gb,
                           **snakemake.params.reading)
