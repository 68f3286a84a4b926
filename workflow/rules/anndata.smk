# scnbvi.h5ad: the results as an AnnData, once the summary and every contrast of the data set are done.
rule anndata:
    input:
        trace=f"{RESULTS}/{{dataset}}/trace.nc",
        cells=f"{RESULTS}/{{dataset}}/cells.tsv",
        genes=f"{RESULTS}/{{dataset}}/genes.tsv",
        stats=f"{RESULTS}/{{dataset}}/fit_stats.json",
        design=f"{RESULTS}/{{dataset}}/design.json",
        qc=f"{RESULTS}/{{dataset}}/qc.json",
        de=lambda wildcards: [f"{RESULTS}/{wildcards.dataset}/de/{name}.tsv" for name in contrasts(wildcards.dataset)],
    output:
        h5ad=f"{RESULTS}/{{dataset}}/scnbvi.h5ad",
    log:
        f"{RESULTS}/{{dataset}}/logs/anndata.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/anndata.tsv"
    conda:
        "../../envs/fit.yaml"
    resources:
        mem_mb=scaled_mem_mb(1000, 4),
        runtime=scaled_runtime(10, 10),
    params:
        code=CODE_VERSION,
        inference=section("inference", leave_out=RUN_ONLY_INFERENCE_SETTINGS),
        model=section("model"),
        contrasts=lambda wildcards: contrasts(wildcards.dataset),
    script:
        "../scripts/anndata.py"
