from _runner import run


def main(snakemake):
    import json
    from pathlib import Path

    import pandas as pd

    from scnbvi.outputs import atomic_output
    from scnbvi.summary import fit_record, result_anndata
    from scnbvi.trace import read_trace

    def read_json(path):
        return json.loads(Path(path).read_text())

    def read_table(path, index):
        # Names such as "NA" or "null" are genes and cells, not missing values.
        header = pd.read_csv(path, sep="\t", nrows=0).columns
        text = {index, "symbol"}
        return pd.read_csv(path, sep="\t", dtype={name: str for name in text}, float_precision="round_trip",
                           keep_default_na=False, na_values={name: [""] for name in header if name not in text},
                           ).set_index(index)

    record = fit_record(
        read_json(snakemake.input.stats),
        snakemake.params.inference,
        snakemake.params.model,
        read_json(snakemake.input.design),
        read_json(snakemake.input.qc),
        read_trace(snakemake.input.trace)["posterior"].attrs,
    )
    contrasts = snakemake.params.contrasts
    record["contrasts"] = contrasts
    # The tables come in the order of the contrasts (the rule's input function).
    tables = {name: read_table(path, "gene") for name, path in zip(contrasts, snakemake.input.de, strict=True)}
    result = result_anndata(read_table(snakemake.input.cells, "cell"), read_table(snakemake.input.genes, "gene"),
                            record, tables)
    with atomic_output(snakemake.output.h5ad) as path:
        result.write_h5ad(path)


run(snakemake, main)
