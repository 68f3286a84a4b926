"""The configuration: the library's defaults are the schema's, and data set names are taken literally."""

import dataclasses
import inspect
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import copy_workflow, snakemake, write_config

from scnbvi.data import SelectedCounts, checked_count_blocks, read_counts, read_counts_with_renames
from scnbvi.offsets import impute_gene_lengths, log_offsets, sequencing_depth
from scnbvi.inference import InferenceSettings
from scnbvi.nuts_check import NutsSettings
from scnbvi.qc import apply_qc_actions, qc_masks, slice_counts, slice_loaded
from scnbvi.simulate import SimulationTruth, simulate_counts

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def _defaults(node: dict):
    """The value the schema fills in for a node: nested objects resolved key by key."""
    if "properties" in node:
        return {key: _defaults(child) for key, child in node["properties"].items()
                if "default" in child or "properties" in child}
    return node["default"]


@pytest.fixture(scope="module")
def dataset_defaults() -> dict:
    schema = yaml.safe_load(SCHEMA.read_text())
    return _defaults(schema["$defs"]["dataset"])


def assert_defaults(function, expected: dict, *, optional=False):
    """Each named parameter's default equals the schema's (``optional``: where it has one)."""
    parameters = inspect.signature(function).parameters
    for name, value in expected.items():
        default = parameters[name].default
        if optional and default is inspect.Parameter.empty:
            continue
        assert default == value and isinstance(default, bool) == isinstance(value, bool), (
            f"{function.__name__}({name}={default!r}), the schema's default is {value!r}"
        )


@pytest.mark.parametrize("function", [slice_counts, slice_loaded])
def test_slice_defaults_match_schema(dataset_defaults, function):
    section = dataset_defaults["slice"]
    assert_defaults(function, {
        "cells_method": section["cells"]["method"],
        "n_cells": section["cells"]["n"],
        "genes_method": section["genes"]["method"],
        "n_genes": section["genes"]["n"],
        "drop_zero_cells": section["drop_zero_cells"],
        "drop_zero_genes": section["drop_zero_genes"],
        "seed": section["seed"],
    })


def test_load_defaults_match_schema(dataset_defaults):
    section = dict(dataset_defaults["load"])
    read_options = {key: section.pop(key) for key in ("duplicate_names", "layer", "gene_symbols")}
    assert_defaults(read_counts, read_options)
    assert_defaults(read_counts_with_renames, read_options)
    assert_defaults(checked_count_blocks, read_options)
    assert_defaults(SelectedCounts, {key: read_options[key] for key in ("duplicate_names", "layer")})
    assert_defaults(apply_qc_actions, section)
    assert_defaults(qc_masks, section)


def test_covariate_defaults_match_schema(dataset_defaults):
    section = dataset_defaults["covariates"]
    depth = section["depth"]
    assert_defaults(sequencing_depth, {
        "source": depth["source"],
        "column": depth["column"],
        "constant": depth["constant"],
        "per_cell": depth["per_cell"],
        "seed": section["seed"],
    })
    assert_defaults(log_offsets, {
        "per_cell": depth["per_cell"],
        "depth_ref": section["depth_ref"],
        "length_ref": section["length_ref"],
    })
    assert_defaults(impute_gene_lengths, {"seed": section["seed"]}, optional=True)


def test_simulation_defaults_match_schema(dataset_defaults):
    section = dict(dataset_defaults["simulate"])
    effects = {key: section.pop(key) for key in ("condition_effect_sd", "batch_effect_sd", "donors", "donor_effect_sd")}
    assert_defaults(simulate_counts, section, optional=True)
    truth = SimulationTruth()
    assert effects == {key: getattr(truth, key) for key in effects}


def test_inference_settings_match_schema(dataset_defaults):
    section = dataset_defaults["inference"]
    fields = {field.name: field.default for field in dataclasses.fields(InferenceSettings)}
    shared = section.keys() & fields.keys()

    assert shared
    for key in sorted(shared):
        assert fields[key] == section[key] and isinstance(fields[key], bool) == isinstance(section[key], bool), (
            f"InferenceSettings.{key} = {fields[key]!r}, the schema's default is {section[key]!r}"
        )


def test_nuts_check_settings_match_schema(dataset_defaults):
    section = dataset_defaults["check"]["nuts"]
    fields = {field.name: field.default for field in dataclasses.fields(NutsSettings)}
    assert fields == section


@pytest.mark.slow
def test_dataset_name_with_regex_characters_is_matched_literally(tmp_path):
    workdir = copy_workflow(tmp_path / "scnbvi")
    config = write_config(workdir, {"datasets": {"v1.0": {"simulate": {"n_cells": 50, "n_genes": 10}}}})

    literal = snakemake(workdir, "--configfile", config, "-n", "results/v1.0/trace.nc")
    lookalike = snakemake(workdir, "--configfile", config, "-n", "results/v1x0/trace.nc")

    assert literal.returncode == 0, literal.stderr
    output = lookalike.stdout + lookalike.stderr
    assert lookalike.returncode != 0
    assert "MissingRuleException" in output or "No rule to produce" in output, output
    assert "KeyError" not in output


@pytest.mark.parametrize("name, valid", [
    (".", False), ("..", False), ("...", False), ("my data", False), ("a/b", False),
    ("v1.0", True), (".hidden", True), ("run-2_b", True),
])
def test_schema_refuses_data_set_names_that_are_not_a_directory_of_their_own(name, valid):
    schema = yaml.safe_load(SCHEMA.read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors({"datasets": {name: {}}}))
    assert (not errors) == valid, errors


@pytest.mark.parametrize("contrasts, valid", [
    ([["condition", "treated", "control"]], True),
    ({"treated": ["condition", "treated", "control"], "v1.0": ["batch", 2, 1]}, True),
    ({"my contrast": ["condition", "treated", "control"]}, False),
    ({"..": ["condition", "treated", "control"]}, False),
    ({"n" * 101: ["condition", "treated", "control"]}, False),
    ({"treated": ["condition", "treated"]}, False),
    ("condition", False),
])
def test_schema_takes_contrasts_as_a_list_or_by_names_that_are_files_of_their_own(contrasts, valid):
    schema = yaml.safe_load(SCHEMA.read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors({"datasets": {"d": {"contrasts": contrasts}}}))
    assert (not errors) == valid, errors


@pytest.mark.slow
@pytest.mark.parametrize("contrasts, names", [
    ([["condition", "treated", "control"], ["condition", "b/1", "control"]],
     ["condition_treated_vs_control", "condition_b_1_vs_control"]),
    ({"treated": ["condition", "treated", "control"], "b.1": ["condition", "b/1", "control"]}, ["treated", "b.1"]),
], ids=["list", "mapping"])
def test_dry_run_plans_each_contrast_under_its_name(tmp_path, contrasts, names):
    """A list's contrasts are named from their parts, made file-safe; a mapping's by its keys."""
    workdir = copy_workflow(tmp_path / "scnbvi")
    dataset = {"simulate": {"n_cells": 50, "n_genes": 10}, "design": {"categorical": ["condition"]},
               "contrasts": contrasts}
    result = snakemake(workdir, "--configfile", write_config(workdir, {"datasets": {"sim": dataset}}), "-n")

    assert result.returncode == 0, result.stdout + result.stderr
    planned = set(re.findall(r"results/sim/de/[\w./-]+", result.stdout))
    assert planned == {f"results/sim/de/{name}{suffix}" for name in names
                       for suffix in (".tsv", ".html", "_ma.png", "_volcano.png")}, result.stdout


def _dry_run_with_config_text(tmp_path, text):
    workdir = copy_workflow(tmp_path / "scnbvi")
    (workdir / "names.yaml").write_text(text)
    result = snakemake(workdir, "--configfile", "names.yaml", "-n")
    return workdir, result


@pytest.mark.slow
@pytest.mark.parametrize("key, shown, quoted", [
    ("123", "123", '"123"'),
    ("1.5", "1.5", '"1.5"'),
    ("on", "True", '"on", as written'),
    ("yes", "True", '"on", as written'),
    ("false", "False", '"on", as written'),
])
def test_data_set_name_read_as_a_number_or_boolean_is_one_config_line(tmp_path, key, shown, quoted):
    workdir, result = _dry_run_with_config_text(tmp_path, f"datasets:\n  {key}:\n    simulate: {{n_cells: 50}}\n")

    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.startswith("config: ")]
    assert result.returncode != 0
    assert lines == [
        f"config: datasets: {shown} is not a valid data set name (a number, boolean or null in YAML, which reads "
        f"on/off/yes/no as booleans); fix: quote it ({quoted}) or rename it"
    ], output
    assert "TypeError" not in output
    assert not (workdir / "results").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", [".", "..", "n" * 300], ids=["dot", "dots", "300-characters"])
def test_data_set_name_of_only_dots_or_too_long_is_one_config_line(tmp_path, name):
    workdir, result = _dry_run_with_config_text(tmp_path, f'datasets:\n  "{name}":\n    simulate: {{n_cells: 50}}\n')

    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.startswith("config: ")]
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(f"config: datasets: {name!r} is not a valid data set name"), output
    assert not (workdir / "results").exists()



@pytest.mark.slow
def test_the_profiles_placeholder_account_is_refused_in_one_line_naming_the_file(tmp_path):
    workdir = copy_workflow(tmp_path / "scnbvi")
    placeholder = snakemake(workdir, "-n", "--default-resources", "slurm_account=myaccount", "mem_mb=100")
    own_account = snakemake(workdir, "-n", "--default-resources", "slurm_account=lab42", "mem_mb=100")
    no_resources = snakemake(workdir, "-n")

    lines = [line for line in (placeholder.stdout + placeholder.stderr).splitlines() if line.startswith("slurm_account")]
    assert placeholder.returncode != 0 and len(lines) == 1, placeholder.stderr
    assert "profiles/slurm/config.yaml" in lines[0]
    assert own_account.returncode == 0, own_account.stderr
    assert no_resources.returncode == 0, no_resources.stderr

def test_model_defaults_match_schema(dataset_defaults):
    from scnbvi.inference import fit
    from scnbvi.model import build_model

    for function in (fit, build_model):
        assert_defaults(function, dataset_defaults["model"])
