from _runner import run


def main(snakemake):
    import json
    import logging

    from scnbvi.data import read_counts_with_renames
    from scnbvi.outputs import code_version, write_json
    from scnbvi.qc import apply_qc_actions, qc_report

    settings = dict(snakemake.params.settings)
    duplicate_names, layer, gene_symbols = (settings.pop(key) for key in ("duplicate_names", "layer", "gene_symbols"))
    adata, renamed = read_counts_with_renames(snakemake.input[0], duplicate_names=duplicate_names, layer=layer,
                                              gene_symbols=gene_symbols)
    report = {"input": str(snakemake.input[0]), "code_version": code_version(), "renamed": renamed,
              "before": qc_report(adata)}
    shape = adata.shape
    adata = apply_qc_actions(adata, **settings)
    report["actions"] = snakemake.params.settings
    # The actions only drop cells and genes: with none dropped, the counts and so their report are the same.
    report["after"] = report["before"] if adata.shape == shape else qc_report(adata)
    logging.getLogger("scnbvi").info("quality report: %s", json.dumps(report))
    write_json(report, snakemake.output.qc)


run(snakemake, main)
