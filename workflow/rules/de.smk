rule de:
    input:
        trace=f"{RESULTS}/{{dataset}}/trace.nc",
        h5ad=input_h5ad,
        selection=f"{RESULTS}/{{dataset}}/selection.h5ad",
        cells=f"{RESULTS}/{{dataset}}/covariates_cells.tsv",
        genes=f"{RESULTS}/{{dataset}}/covariates_genes.tsv",
        design=f"{RESULTS}/{{dataset}}/design.json",
    output:
        table=report(
            f"{RESULTS}/{{dataset}}/de/{{contrast}}.tsv",
            caption="../report/de.rst",
            category="Differential expression",
            subcategory="{dataset}",
        ),
        ma=report(
            f"{RESULTS}/{{dataset}}/de/{{contrast}}_ma.png",
            caption="../report/de_ma.rst",
            category="Differential expression",
            subcategory="{dataset}",
        ),
        volcano=report(
            f"{RESULTS}/{{dataset}}/de/{{contrast}}_volcano.png",
            caption="../report/de_volcano.rst",
            category="Differential expression",
            subcategory="{dataset}",
        ),
        html=report(
            f"{RESULTS}/{{dataset}}/de/{{contrast}}.html",
            caption="../report/de_html.rst",
            category="Differential expression",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/de/{{contrast}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/de/{{contrast}}.tsv"
    conda:
        "../../envs/fit.yaml"
    resources:
        mem_mb=streamed_mem_mb(2000, 4),
        runtime=scaled_runtime(15, 20),
    params:
        code=CODE_VERSION,
        reading=counts_reading,
        contrast=contrast_of,
        settings=section("de"),
        gene_symbols=gene_symbols,
    script:
        "../scripts/de.py"


# PyDESeq2 on counts summed per sample, beside scnbvi's table: only with design.random.
rule pseudobulk:
    input:
        table=f"{RESULTS}/{{dataset}}/de/{{contrast}}.tsv",
        h5ad=input_h5ad,
        selection=f"{RESULTS}/{{dataset}}/selection.h5ad",
        cells=f"{RESULTS}/{{dataset}}/covariates_cells.tsv",
        genes=f"{RESULTS}/{{dataset}}/covariates_genes.tsv",
        design=f"{RESULTS}/{{dataset}}/design.json",
    output:
        table=report(
            f"{RESULTS}/{{dataset}}/de/pseudobulk/{{contrast}}.tsv",
            caption="../report/de_pseudobulk.rst",
            category="Differential expression",
            subcategory="{dataset}",
        ),
        agreement=report(
            f"{RESULTS}/{{dataset}}/de/pseudobulk/{{contrast}}_agreement.tsv",
            caption="../report/de_agreement.rst",
            category="Differential expression",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/de/pseudobulk/{{contrast}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/de/pseudobulk/{{contrast}}.tsv"
    conda:
        "../../envs/pseudobulk.yaml"
    resources:
        mem_mb=streamed_mem_mb(1000, 4),
        runtime=scaled_runtime(10, 10),
    params:
        code=CODE_VERSION,
        reading=counts_reading,
        contrast=contrast_of,
        lfsr_level=lambda wildcards: dataset_config(wildcards)["de"]["lfsr_level"],
    script:
        "../scripts/pseudobulk.py"
