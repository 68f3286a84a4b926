# Cell-cycle scores per cell, opt-in: only a data set whose cell_cycle section names gene lists
# has them. Input functions: cell_cycle_inputs.smk.


rule cell_cycle:
    input:
        h5ad=input_h5ad,
        selection=f"{RESULTS}/{{dataset}}/selection.h5ad",
        lists=cell_cycle_lists,
    output:
        f"{RESULTS}/{{dataset}}/cell_cycle.tsv",
    log:
        f"{RESULTS}/{{dataset}}/logs/cell_cycle.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/cell_cycle.tsv"
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=scaled_mem_mb(1000, 6),
        runtime=scaled_runtime(10, 20),
    params:
        code=CODE_VERSION,
        reading=counts_reading,
        settings=section("cell_cycle"),
    script:
        "../scripts/cell_cycle.py"
