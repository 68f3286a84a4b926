rule simulate:
    output:
        f"{RESULTS}/{{dataset}}/simulated.h5ad",
    log:
        f"{RESULTS}/{{dataset}}/logs/simulate.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/simulate.tsv"
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=CODE_VERSION,
        settings=section("simulate"),
    script:
        "../scripts/simulate.py"


rule load:
    input:
        input_h5ad,
    output:
        qc=f"{RESULTS}/{{dataset}}/qc.json",
        loaded=f"{RESULTS}/{{dataset}}/loaded.h5ad",
    log:
        f"{RESULTS}/{{dataset}}/logs/load.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/load.tsv"
    conda:
        "../../envs/data.yaml"
    resources:
        # One block of cells and the per-cell statistics: not the matrix, whatever the input's size.
        mem_mb=scaled_mem_mb(3000, 0),
        runtime=scaled_runtime(10, 20),
    params:
        code=CODE_VERSION,
        settings=section("load"),
        # Not only its modification time: its content, cheaply (see input_identity).
        identity=input_identity,
    script:
        "../scripts/load.py"


# Selects from the cells and genes load kept (loaded.h5ad, no counts); reads the input's counts, as load
# did, only for what needs them. The input is an input here too: a file changed after load reruns it.
rule slice:
    input:
        h5ad=input_h5ad,
        loaded=f"{RESULTS}/{{dataset}}/loaded.h5ad",
    output:
        f"{RESULTS}/{{dataset}}/selection.h5ad",
    log:
        f"{RESULTS}/{{dataset}}/logs/slice.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/slice.tsv"
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=slice_mem_mb,
        runtime=scaled_runtime(10, 20),
    params:
        code=CODE_VERSION,
        reading=counts_reading,
        settings=section("slice"),
    script:
        "../scripts/slice.py"


rule covariates:
    input:
        selection=f"{RESULTS}/{{dataset}}/selection.h5ad",
        annotation=covariate_files,
        cell_cycle=cell_cycle_table,
    output:
        cells=f"{RESULTS}/{{dataset}}/covariates_cells.tsv",
        genes=f"{RESULTS}/{{dataset}}/covariates_genes.tsv",
        design=f"{RESULTS}/{{dataset}}/design.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/covariates.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/covariates.tsv"
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=scaled_mem_mb(1000, 4),
        runtime=scaled_runtime(10, 10),
    params:
        code=CODE_VERSION,
        settings=section("covariates"),
        design=section("design"),
        contrasts=configured_contrasts,
    script:
        "../scripts/covariates.py"
