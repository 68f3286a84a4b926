from _runner import run


def main(snakemake):
    import json
    import logging

    from scnbvi.data import apply_qc_actions, atomic_output, qc_report, read_counts, write_counts

    settings = snakemake.params.settings
    adata = read_counts(snakemake.input[0])
    report = {"input": str(snakemake.input[0]), "before": qc_report(adata)}
    adata = apply_qc_actions(adata, **settings)
    report["actions"] = settings
    report["after"] = qc_report(adata)
    logging.getLogger("scnbvi").info("quality report: %s", json.dumps(report))
    write_counts(adata, snakemake.output.h5ad)
    with atomic_output(snakemake.output.qc) as path:
        path.write_text(json.dumps(report, indent=2) + "\n")


run(snakemake, main)
