# Inputs of the opt-in cell_cycle rule and of the rules that use its scores. Apart from
# cell_cycle.smk (the linter wants functions and rules in separate files) and included before
# data.smk, so that any rule there can name them.


def cell_cycle_lists(wildcards):
    """The S-phase and G2/M-phase gene lists, in that order."""
    settings = dataset_config(wildcards)["cell_cycle"]
    for key in ("s_genes", "g2m_genes"):
        if not settings[key]:
            raise WorkflowError(
                f"config: datasets.{wildcards.dataset}.cell_cycle.{key}: missing; "
                "fix: give both gene lists (s_genes and g2m_genes), or neither"
            )
    return [settings["s_genes"], settings["g2m_genes"]]


def cell_cycle_table(wildcards):
    """The scores as an input of the rules that use them; none when the data set names no lists."""
    if dataset_config(wildcards)["cell_cycle"]["s_genes"]:
        return [f"{RESULTS}/{wildcards.dataset}/cell_cycle.tsv"]
    return []
