# Posterior predictive checks: counts replicated from the posterior against the observed ones.


rule ppc:
    input:
        trace=f"{RESULTS}/{{dataset}}/trace.nc",
        h5ad=input_h5ad,
        selection=f"{RESULTS}/{{dataset}}/selection.h5ad",
        cells=f"{RESULTS}/{{dataset}}/covariates_cells.tsv",
        genes=f"{RESULTS}/{{dataset}}/covariates_genes.tsv",
        design=f"{RESULTS}/{{dataset}}/design.json",
    output:
        genes=report(
            f"{RESULTS}/{{dataset}}/ppc_genes.tsv",
            caption="../report/ppc_genes.rst",
            category="Posterior predictive checks",
            subcategory="{dataset}",
        ),
        cells=f"{RESULTS}/{{dataset}}/ppc_cells.tsv",
        verdict=f"{RESULTS}/{{dataset}}/ppc.json",
        zero_fraction=report(
            f"{RESULTS}/{{dataset}}/ppc_zero_fraction.png",
            caption="../report/ppc_zero_fraction.rst",
            category="Posterior predictive checks",
            subcategory="{dataset}",
        ),
        mean_variance=report(
            f"{RESULTS}/{{dataset}}/ppc_mean_variance.png",
            caption="../report/ppc_mean_variance.rst",
            category="Posterior predictive checks",
            subcategory="{dataset}",
        ),
        library_size=report(
            f"{RESULTS}/{{dataset}}/ppc_library_size.png",
            caption="../report/ppc_library_size.rst",
            category="Posterior predictive checks",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/ppc.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/ppc.tsv"
    # The longest of the jobs that wait for the fit: started first, the others share the other cores meanwhile.
    priority: 1
    conda:
        "../../envs/fit.yaml"
    resources:
        mem_mb=mem_mb_besides_counts(2000, 4),
        runtime=scaled_runtime(30, 20),
    params:
        code=CODE_VERSION,
        reading=counts_reading,
        settings=section("ppc"),
    script:
        "../scripts/ppc.py"
