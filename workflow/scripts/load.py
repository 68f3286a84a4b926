from _runner import run


def main(snakemake):
    import json
    import logging

    from scnbvi.data import apply_qc_actions, qc_report, read_counts, write_counts
    from scnbvi.outputs import write_json

    settings = snakemake.params.settings
    adata = read_counts(snakemake.input[0])
    report = {"input": str(snakemake.input[0]), "before": qc_report(adata)}
    adata = apply_qc_actions(adata, **settings)
    report["actions"] = settings
    report["after"] = qc_report(adata)
    logging.getLogger("scnbvi").info("quality report: %s", json.dumps(report))
    write_counts(adata, snakemake.output.h5ad)
    write_json(report, snakemake.output.qc)


run(snakemake, main)
