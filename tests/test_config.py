"""The configuration: the library's defaults are the schema's, and data set names are taken literally."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from conftest import copy_workflow, snakemake, write_config

from scnbvi.covariates import impute_gene_lengths, log_offsets, sequencing_depth
from scnbvi.data import apply_qc_actions, slice_counts
from scnbvi.inference import InferenceSettings
from scnbvi.simulate import simulate_counts

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


def test_slice_defaults_match_schema(dataset_defaults):
    section = dataset_defaults["slice"]
    assert_defaults(slice_counts, {
        "cells_method": section["cells"]["method"],
        "n_cells": section["cells"]["n"],
        "genes_method": section["genes"]["method"],
        "n_genes": section["genes"]["n"],
        "drop_zero_cells": section["drop_zero_cells"],
        "drop_zero_genes": section["drop_zero_genes"],
        "seed": section["seed"],
    })


def test_load_defaults_match_schema(dataset_defaults):
    assert_defaults(apply_qc_actions, dataset_defaults["load"])


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
    assert_defaults(simulate_counts, dataset_defaults["simulate"], optional=True)


def test_inference_settings_match_schema(dataset_defaults):
    section = dataset_defaults["inference"]
    fields = {field.name: field.default for field in dataclasses.fields(InferenceSettings)}
    shared = section.keys() & fields.keys()

    assert shared
    for key in sorted(shared):
        assert fields[key] == section[key] and isinstance(fields[key], bool) == isinstance(section[key], bool), (
            f"InferenceSettings.{key} = {fields[key]!r}, the schema's default is {section[key]!r}"
        )


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
