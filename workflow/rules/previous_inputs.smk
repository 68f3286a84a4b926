# Input and params functions of the previous rule (previous.smk), and the targets it adds.
import yaml

# Kept with a data set's targets: how the fit went, and what the design's coefficients mean.
ALSO_KEPT = ("fit_stats.json", "design.json")

_results_of_each_dataset = all_outputs


def all_outputs():
    """The results of every data set, and the copy of them that a failed rerun leaves in place."""
    return _results_of_each_dataset() + [f"{RESULTS}/{d}/previous.json" for d in DATASETS]


def finished_results(wildcards):
    """The data set's targets and ALSO_KEPT, so the copy is taken only when all of them are done."""
    directory = f"{RESULTS}/{wildcards.dataset}/"
    targets = [path for path in _results_of_each_dataset() if path.startswith(directory)]
    return list(dict.fromkeys(targets + [directory + name for name in ALSO_KEPT]))


def run_config_yaml(wildcards):
    """A config file that reruns the data set as it was: the backend and the data set's sections.

    Made here as text, so the job's environment needs no YAML package. It is a param, so a change
    of any of the data set's settings takes a new copy once the results follow it."""
    run_config = {"backend": config["backend"], "datasets": {wildcards.dataset: dataset_config(wildcards)}}
    return yaml.safe_dump(run_config, sort_keys=False)
