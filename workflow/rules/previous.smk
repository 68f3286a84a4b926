# Snakemake deletes a job's outputs before rerunning it, so a rerun that fails would leave a data
# set without results. Once all of a data set's results are finished, this rule keeps them in
# results/{dataset}/previous/ (hard links where possible), which no later job deletes. A rule
# rather than an onsuccess handler: it runs per data set, also under --keep-going when another
# data set fails, and a dry run lists it.


include: "previous_inputs.smk"


rule previous:
    input:
        finished_results,
    output:
        f"{RESULTS}/{{dataset}}/previous.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/previous.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        code=CODE_VERSION,
        config=run_config_yaml,
        results=lambda wildcards: f"{RESULTS}/{wildcards.dataset}",
    script:
        "../scripts/previous.py"
