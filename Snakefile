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


# A misspelled design column or contrast level, or missing values in a design column, stop the run
# here, seconds after it starts and before any job, with the covariates rule's own one-line error.
onstart:
    errors = design_errors()
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        sys.exit(1)


# How each data set's fit went, among the run's closing lines.
onsuccess:
    for line in run_report(RESULTS, DATASETS):
        print(line, file=sys.stderr)


# Snakemake's own report of a failure runs to many lines; each failed job's one-line error
# (what is wrong and the fix) is repeated below it, among the run's closing lines.
onerror:
    for line in failed_jobs_errors():
        print(line, file=sys.stderr)
