# scnbvi: hierarchical Negative-Binomial model of single-cell counts, fitted by minibatch ADVI.
# Usage: see README.md. Configuration: config/config.yaml, validated by workflow/schemas/.

configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/cell_cycle_inputs.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/cell_cycle.smk"
include: "workflow/rules/fit.smk"


localrules:
    all,


rule all:
    input:
        all_outputs(),
