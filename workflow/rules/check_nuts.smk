rule check_nuts:
    input:
        h5ad=input_h5ad,
        selection=f"{RESULTS}/{{dataset}}/selection.h5ad",
        cells=f"{RESULTS}/{{dataset}}/covariates_cells.tsv",
        genes=f"{RESULTS}/{{dataset}}/covariates_genes.tsv",
        design=f"{RESULTS}/{{dataset}}/design.json",
    output:
        table=report(
            f"{RESULTS}/{{dataset}}/check_nuts.tsv",
            caption="../report/check_nuts.rst",
            category="Convergence",
            subcategory="{dataset}",
        ),
        record=f"{RESULTS}/{{dataset}}/check_nuts.json",
        plot=report(
            f"{RESULTS}/{{dataset}}/check_nuts.png",
            caption="../report/check_nuts.rst",
            category="Convergence",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/check_nuts.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/check_nuts.tsv"
    conda:
        "../../envs/fit.yaml"
    threads: config["threads"]
    resources:
        mem_mb=streamed_mem_mb(2000, 4),
        runtime=nuts_runtime,
    params:
        code=CODE_VERSION,
        reading=counts_reading,
        nuts=nuts_section,
        inference=section("inference", leave_out=RUN_ONLY_INFERENCE_SETTINGS),
        model=section("model"),
        backend=config["backend"],
    script:
        "../scripts/check_nuts.py"
