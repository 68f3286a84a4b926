# Input and params functions of the previous rule (previous.smk).
import yaml

# Kept with a data set's targets: how the fit went, and what the design's coefficients mean.
ALSO_KEPT = ("fit_stats.json", "design.json")


def finished_results(wildcards):
    """The data set's results and ALSO_KEPT, so the copy is taken only when all of them are done."""
    directory = f"{RESULTS}/{wildcards.dataset}/"
    return dataset_results(wildcards.dataset) + [directory + name for name in ALSO_KEPT]


def run_config_yaml(wildcards):
    """A config file that reruns the data set as it was: the backend and the data set's sections.

    Made here as text, so the job's environment needs no YAML package. It is a param, so a change
    of any of the data set's settings takes a new copy once the results follow it (settings that
    only say how the fit runs are left out: they change no result)."""
    dataset = {**dataset_config(wildcards), "inference": section("inference", RUN_ONLY_INFERENCE_SETTINGS)(wildcards)}
    run_config = {"backend": config["backend"], "datasets": {wildcards.dataset: dataset}}
    return yaml.safe_dump(run_config, sort_keys=False)
