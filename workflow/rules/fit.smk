rule fit:
    input:
        h5ad=input_h5ad,
        selection=f"{RESULTS}/{{dataset}}/selection.h5ad",
        cells=f"{RESULTS}/{{dataset}}/covariates_cells.tsv",
        genes=f"{RESULTS}/{{dataset}}/covariates_genes.tsv",
        design=f"{RESULTS}/{{dataset}}/design.json",
    output:
        trace=f"{RESULTS}/{{dataset}}/trace.nc",
        elbo=f"{RESULTS}/{{dataset}}/elbo.tsv",
        stats=f"{RESULTS}/{{dataset}}/fit_stats.json",
        cells=f"{RESULTS}/{{dataset}}/cells.tsv",
    log:
        f"{RESULTS}/{{dataset}}/logs/fit.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/fit.tsv"
    conda:
        "../../envs/fit.yaml"
    threads: config["threads"]
    resources:
        mem_mb=streamed_mem_mb(2000, 8),
        runtime=fit_runtime,
    params:
        code=CODE_VERSION,
        reading=counts_reading,
        inference=section("inference", leave_out=RUN_ONLY_INFERENCE_SETTINGS),
        model=section("model"),
        backend=config["backend"],
        run_only=RUN_ONLY_INFERENCE_SETTINGS,
        # Not an output: Snakemake would delete it before a rerun, which must resume from it.
        checkpoint=lambda wildcards: f"{RESULTS}/{wildcards.dataset}/fit.checkpoint",
    script:
        "../scripts/fit.py"


rule summary:
    input:
        trace=f"{RESULTS}/{{dataset}}/trace.nc",
        selection=f"{RESULTS}/{{dataset}}/selection.h5ad",
    output:
        summary=report(
            f"{RESULTS}/{{dataset}}/summary.csv",
            caption="../report/summary.rst",
            category="Posterior",
            subcategory="{dataset}",
        ),
        genes=report(
            f"{RESULTS}/{{dataset}}/genes.tsv",
            caption="../report/genes.rst",
            category="Posterior",
            subcategory="{dataset}",
        ),
        genes_html=report(
            f"{RESULTS}/{{dataset}}/genes.html",
            caption="../report/genes_html.rst",
            category="Posterior",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/summary.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/summary.tsv"
    conda:
        "../../envs/fit.yaml"
    resources:
        mem_mb=scaled_mem_mb(2000, 4),
        runtime=scaled_runtime(30, 20),
    params:
        code=CODE_VERSION,
        gene_symbols=gene_symbols,
    script:
        "../scripts/summary.py"


rule plot_elbo:
    input:
        elbo=f"{RESULTS}/{{dataset}}/elbo.tsv",
        stats=f"{RESULTS}/{{dataset}}/fit_stats.json",
        qc=f"{RESULTS}/{{dataset}}/qc.json",
        cells=f"{RESULTS}/{{dataset}}/covariates_cells.tsv",
        genes=f"{RESULTS}/{{dataset}}/covariates_genes.tsv",
    output:
        plot=report(
            f"{RESULTS}/{{dataset}}/elbo.png",
            caption="../report/elbo.rst",
            category="Convergence",
            subcategory="{dataset}",
        ),
        qc=report(
            f"{RESULTS}/{{dataset}}/qc.html",
            caption="../report/qc.rst",
            category="Quality control",
            subcategory="{dataset}",
        ),
        fit=report(
            f"{RESULTS}/{{dataset}}/fit_stats.html",
            caption="../report/fit_stats.rst",
            category="Convergence",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/plot_elbo.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/plot_elbo.tsv"
    conda:
        "../../envs/plot.yaml"
    resources:
        mem_mb=scaled_mem_mb(1000, 20),
        runtime=scaled_runtime(10, 5),
    params:
        code=CODE_VERSION,
    script:
        "../scripts/plot_elbo.py"
