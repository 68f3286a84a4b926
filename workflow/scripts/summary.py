from _runner import run


def main(snakemake):
    import json
    import logging
    import time
    from pathlib import Path

    import anndata as ad
    import arviz as az
    import pandas as pd

    from scnbvi.outputs import atomic_output, write_table
    from scnbvi.summary import fit_record, gene_table, posterior_summary, result_anndata

    def read_json(path):
        return json.loads(Path(path).read_text())

    # Silent for minutes on large data otherwise: each stage's end, with the seconds since the start.
    progress, started = logging.getLogger("scnbvi.progress"), time.perf_counter()

    def done(stage):
        progress.info("%s (%.0f s)", stage, time.perf_counter() - started)

    idata = az.from_netcdf(snakemake.input.trace)
    adata = ad.read_h5ad(snakemake.input.h5ad)
    done("read the trace and the counts")
    write_table(posterior_summary(idata), snakemake.output.summary, sep=",")
    done(f"wrote {snakemake.output.summary}")
    genes = gene_table(idata, adata.X, adata.var_names)
    write_table(genes, snakemake.output.genes)
    done(f"wrote {snakemake.output.genes}")
    cells = pd.read_csv(snakemake.input.cells, sep="\t", dtype={"cell": str}, float_precision="round_trip")
    record = fit_record(
        read_json(snakemake.input.stats),
        snakemake.params.inference,
        snakemake.params.model,
        read_json(snakemake.input.design),
        read_json(snakemake.input.qc),
        idata.posterior.attrs,
    )
    with atomic_output(snakemake.output.h5ad) as path:
        result_anndata(cells.set_index("cell"), genes, record).write_h5ad(path)
    done(f"wrote {snakemake.output.h5ad}")


run(snakemake, main)
