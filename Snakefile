# scnbvi: hierarchical Negative-Binomial model of single-cell counts, fitted by minibatch ADVI.
# Usage: see README.md. Configuration: config/config.yaml, validated by workflow/schemas/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# The landing page of `snakemake --report`.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/cell_cycle_inputs.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/cell_cycle.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/de.smk"
include: "workflow/rules/anndata.smk"
include: "workflow/rules/check_nuts.smk"
include: "workflow/rules/ppc.smk"
include: "workflow/rules/previous.smk"


localrules:
    all,


rule all:
    input:
        all_outputs(),


# Snakemake's own report of a failure runs to many lines; each failed job's one-line error
# (what is wrong and the fix) is repeated below it, among the run's closing lines.
onerror:
    for line in failed_jobs_errors():
        print(line, file=sys.stderr)
