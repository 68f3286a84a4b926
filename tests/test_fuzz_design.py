"""Property-based fuzzing of the design and everything after it (design, fit, DE, PPC) with random
obs columns (strings, numbers, booleans, categoricals; missing values; unicode, brackets, slashes
and spaces in names and levels) and random designs and contrasts. The test decides from the drawn
input alone whether the design must be refused: a refusal is one InputError line naming an
offending column or level, and a design it finds valid must go through to well-formed tables."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from conftest import copy_workflow, snakemake, write_config
from scnbvi.de import contrast_table
from scnbvi.design import MANY_LEVELS, design_from_config, read_design, write_design
from scnbvi.errors import InputError
from scnbvi.inference import InferenceSettings, fit
from scnbvi.naming import contrast_name
from scnbvi.posterior import draw_posterior
from scnbvi.ppc import centred_covariates, check, posterior_draws, select_cells

# One shape for every example, so that each fit costs the same.
N_CELLS, N_GENES = 60, 6
# Distinct names, none a part of another, so that a message naming one names no other.
COLUMN_NAMES = ("条件", "a/b", "cond[x]", "with space", "batch", "score", "donor", "flag")
LEVELS = ("ctrl", "处理", "a/b", "x[1]", "two words", "B", "0", "True")
# obs columns, by how their values are made; the first kinds are the ones most designs accept.
KINDS = ("text", "float", "text", "integer", "boolean", "category", "samples", "per_sample", "constant", "many",
         "alias")
FIT = InferenceSettings(max_iterations=20, check_every=10, draws=20)
PPC_CELLS, PPC_DRAWS = 30, 10
FILE_SAFE = re.compile(r"^(?![.]+$)[A-Za-z0-9_.-]+$")
UNKNOWN = "zz"


def column_values(kind: str, n_levels: int, seed: int, earlier: list[pd.Series]):
    """The values of one obs column of ``kind`` (``earlier``: the columns made before it)."""
    rng = np.random.default_rng(seed)
    cell = np.arange(N_CELLS)
    levels = np.array([LEVELS[(seed + i) % len(LEVELS)] for i in range(n_levels)], dtype=object)
    if kind == "text":
        return levels[rng.integers(n_levels, size=N_CELLS)]
    if kind == "integer":
        return rng.integers(n_levels, size=N_CELLS) + 1
    if kind == "float":
        return rng.normal(5.0, 2.0, N_CELLS)
    if kind == "boolean":
        return rng.random(N_CELLS) < 0.5
    if kind == "category":  # with a category no cell has
        return pd.Categorical(levels[rng.integers(n_levels, size=N_CELLS)], categories=[*levels, "unused"])
    if kind == "samples":  # blocks of cells, one sample each
        return np.array([f"s{i}/{LEVELS[i]}" for i in cell * (n_levels + 1) // N_CELLS], dtype=object)
    if kind == "per_sample":  # constant within the 5 samples of a samples column of 4 levels
        return np.array(["ctrl", "处理"], dtype=object)[(cell * 5 // N_CELLS) % 2]
    if kind == "constant":
        return np.full(N_CELLS, levels[0], dtype=object)
    if kind == "many":  # more levels than a design takes for this many cells
        return np.array([f"w[{i % (MANY_LEVELS + 5)}]" for i in cell], dtype=object)
    # alias: an earlier column's cells under other names, so the two are confounded
    source = earlier[-1] if earlier else pd.Series(levels[cell % n_levels])
    return np.array([f"{value} 别名" for value in source.astype(str)], dtype=object)


def with_missing(values, missing: str | None, seed: int):
    """The values with one missing (NaN) or infinite entry."""
    if missing is None:
        return values
    position = seed % N_CELLS
    if isinstance(values, pd.Categorical):
        values = values.copy()
        values[position] = np.nan
        return values
    numeric = np.asarray(values).dtype.kind in "if"
    values = np.array(values, dtype=np.float64 if numeric else object)
    values[position] = np.inf if missing == "inf" and numeric else np.nan
    return values


@st.composite
def cases(draw):
    """obs columns, a design config and contrasts, drawn with valid choices first."""
    names = draw(st.lists(st.sampled_from(COLUMN_NAMES), min_size=1, max_size=4, unique=True))
    columns: dict[str, pd.Series] = {}
    for name in names:
        kind = draw(st.sampled_from(KINDS))
        n_levels, seed = draw(st.integers(2, 4)), draw(st.integers(0, 50))
        values = column_values(kind, n_levels, seed, list(columns.values()))
        missing = draw(st.sampled_from((*[None] * 10, "nan", "inf")))
        columns[name] = pd.Series(with_missing(values, missing, seed), index=[f"c{i}" for i in range(N_CELLS)])
        note(f"obs[{name!r}]: {kind}, {n_levels} levels, seed {seed}, missing {missing}")
    obs = pd.DataFrame(columns)
    # A name used twice, a column obs lacks or a level it lacks: each a rarer choice than a valid one.
    categorical = draw(st.lists(st.sampled_from([*names, *names, "absent"]), max_size=3, unique=True))
    others = [c for c in names if c not in categorical]
    continuous = draw(st.lists(st.sampled_from([*others, *others, *categorical] or names), max_size=2, unique=True))
    others = [c for c in others if c not in continuous]
    random = draw(st.lists(st.sampled_from([*others, *others, *categorical] or names), max_size=1))
    reference = {}
    if categorical:
        for column in draw(st.lists(st.sampled_from([*categorical, *categorical, "absent"]), max_size=2,
                                    unique=True)):
            levels = levels_of(obs, column)[:3]
            reference[column] = draw(st.sampled_from([*levels, *levels, UNKNOWN]))
    contrasts = []
    for _ in range(draw(st.integers(0, 2))):
        column = draw(st.sampled_from([*categorical, *categorical, *names]))
        levels = levels_of(obs, column)[:4]
        levels = st.sampled_from([*levels, *levels, UNKNOWN])
        contrasts.append([column, draw(levels), draw(levels)])
    design = {"categorical": categorical, "continuous": continuous, "reference": reference, "random": random}
    return obs, design, contrasts


def levels_of(obs: pd.DataFrame, column: str) -> list[str]:
    """The column's levels as the config names them (strings), the most frequent first."""
    if column not in obs or obs[column].isna().all():
        return []
    return list(obs[column].dropna().astype(str).value_counts().index)


def column_problems(frame: pd.DataFrame, categorical, continuous, reference) -> list[str]:
    """What names the columns of ``frame`` (cells, or one row per sample) that cannot be design
    columns: a categorical one of one level, of too many levels or without its reference level; a
    continuous one that is no number, not finite or constant."""
    problems = []
    for column in categorical:
        levels = frame[column].astype(str)
        n_levels = levels.nunique()
        too_many = n_levels > MANY_LEVELS and n_levels > len(frame) // 10
        unknown_reference = column in reference and str(reference[column]) not in set(levels)
        if n_levels < 2 or too_many or unknown_reference:
            problems.append(repr(column))
    for column in continuous:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            problems.append(repr(column))
        elif not np.isfinite(values.to_numpy(dtype=np.float64)).all() or values.std(ddof=0) == 0:
            problems.append(repr(column))
    return problems


def rank_and_columns(frame: pd.DataFrame, categorical, continuous, extra=None) -> tuple[int, int]:
    """The rank and the number of columns of an intercept, the categorical columns' indicators (one
    level left out each), the continuous columns and ``extra`` indicators."""
    parts = [np.ones((len(frame), 1))]
    parts += [pd.get_dummies(frame[c].astype(str), drop_first=True).to_numpy(dtype=np.float64) for c in categorical]
    parts += [frame[[c]].to_numpy(dtype=np.float64) for c in continuous]
    if extra is not None:
        parts.append(extra)
    matrix = np.column_stack(parts)
    return int(np.linalg.matrix_rank(matrix)), matrix.shape[1]


def expected_problems(obs: pd.DataFrame, design: dict, contrasts) -> list[str]:
    """What the refusal of this design and these contrasts must name (a column, a level), or
    nothing where they are valid; decided from the values, not by the code under test."""
    categorical, continuous, random, reference = (design[key] for key in ("categorical", "continuous", "random",
                                                                           "reference"))
    named = [*categorical, *continuous, *random]
    problems = [repr(c) for c in set(named) if named.count(c) > 1]
    problems += [repr(c) for c in reference if c not in categorical]
    if problems:  # refused before any column is read
        return problems
    usable = {c for c in named if c in obs and not obs[c].isna().any()}
    problems += [repr(c) for c in set(named) - usable]
    nested, samples = [], None
    if random and random[0] in usable:
        samples = obs[random[0]].astype(str)
        n_samples = samples.nunique()
        if n_samples < 3 or (n_samples > MANY_LEVELS and n_samples > N_CELLS // 10):
            problems.append(repr(random[0]))
        nested = [c for c in [*categorical, *continuous] if c in usable
                  and (obs[c].astype(str).groupby(samples.to_numpy()).nunique() == 1).all()]
    cell_categorical = [c for c in categorical if c in usable and c not in nested]
    cell_continuous = [c for c in continuous if c in usable and c not in nested]
    problems += column_problems(obs, cell_categorical, cell_continuous, reference)
    per_sample = obs.groupby(samples.to_numpy())[nested].first() if samples is not None else None
    sample_categorical = [c for c in categorical if c in nested]
    sample_continuous = [c for c in continuous if c in nested]
    if samples is not None:
        problems += column_problems(per_sample, sample_categorical, sample_continuous, reference)
    if problems:
        return problems
    indicators = None if samples is None else pd.get_dummies(samples, drop_first=True).to_numpy(dtype=np.float64)
    rank, n_columns = rank_and_columns(obs, cell_categorical, cell_continuous, indicators)
    if rank < n_columns:
        return [c for c in named]  # the message lists the dependent coefficients
    if samples is not None:
        # Sample-level columns must be independent and leave a spread between samples to estimate.
        rank, n_columns = rank_and_columns(per_sample, sample_categorical, sample_continuous)
        if rank < n_columns or len(per_sample) <= rank:
            return [*nested, random[0]]
    for column, numerator, denominator in contrasts:
        if column not in categorical:
            return [repr(column)]
        levels = set(levels_of(obs, column))
        unknown = [repr(level) for level in (numerator, denominator) if level not in levels]
        if unknown or numerator == denominator:
            return unknown or [repr(numerator)]
    return []


def assert_one_line_naming(error: InputError, problems: list[str]):
    message = str(error)
    assert error.source and error.field and error.fix and len(message.splitlines()) == 1, message
    assert any(problem in message for problem in problems), f"{message!r} names none of {problems}"


def counts_and_depth(seed: int):
    rng = np.random.default_rng(seed)
    depth = rng.lognormal(0.0, 0.3, N_CELLS)
    counts = rng.poisson(depth[:, None] * rng.lognormal(1.0, 0.5, N_GENES)[None, :])
    return sp.csr_matrix(counts.astype(np.int64)), depth


def assert_well_formed_contrast(table: pd.DataFrame, gene_names):
    assert sorted(table.index) == sorted(gene_names), "not one row per gene"
    numbers = table.drop(columns=[c for c in ("df",) if c in table]).to_numpy(dtype=np.float64)
    assert np.isfinite(numbers).all(), table
    assert table["lfsr"].between(0.0, 1.0).all() and table["svalue"].between(0.0, 1.0).all(), table
    svalue = table.sort_values(["lfsr", "svalue"])["svalue"].to_numpy()
    assert np.all(np.diff(svalue) >= -1e-12), table
    assert table["prob_large_change"].between(0.0, 1.0).all(), table


def assert_well_formed_ppc(result, gene_names, n_cells):
    assert list(result.genes.index) == list(gene_names) and len(result.cells) == n_cells
    verdict = result.verdict
    for share in [*verdict["genes_outside_band"].values(), *verdict["cells_outside_band"].values()]:
        assert 0.0 <= share <= 1.0, verdict
    for column in result.genes.columns:
        if column.endswith("_p_value"):
            assert result.genes[column].between(0.0, 1.0).all(), result.genes
    assert np.isfinite(result.library_sizes).all()


def design_fit_de_ppc(obs: pd.DataFrame, design_config: dict, contrasts, directory: Path):
    """The package calls of the covariates, fit, de and ppc rules, the design through its file."""
    design = design_from_config(obs, design_config, contrasts)
    cells = design.table(obs.index)
    write_design(design, directory / "design.json")
    json.loads((directory / "design.json").read_text())
    design = read_design(directory / "design.json", cells)
    counts, depth = counts_and_depth(len(design.names))
    gene_names = [f"g{g}" for g in range(N_GENES)]
    cell_log_offset = np.log(depth / depth.mean())
    model, result = fit(counts, cell_log_offset, np.zeros(N_GENES), FIT, backend="jax", gene_dispersion=False,
                        cell_names=obs.index, gene_names=gene_names,
                        design=design if design.n_coefficients else None)
    assert result.steps > 0 and np.isfinite(result.losses).all()
    idata = draw_posterior(model, result, FIT.draws, 0)
    for contrast in contrasts:
        name = contrast_name(*contrast)
        assert FILE_SAFE.match(name) and len(name) <= 100, name
        (directory / f"{name}.tsv").touch()
        table = contrast_table(idata, design, tuple(contrast), counts, depth).table
        assert_well_formed_contrast(table, gene_names)
    checked = select_cells(idata.posterior["cell"].values, PPC_CELLS, 0)
    rows = obs.index.get_indexer(checked)
    draws = posterior_draws(idata, checked, PPC_DRAWS, 0)
    covariates = centred_covariates(design, draws.coefficients)[rows] if draws.beta is not None else None
    ppc = check(counts[rows], draws, cell_log_offset[rows], np.zeros(N_GENES), covariates, cell_names=checked,
                gene_names=gene_names, seed=0)
    assert_well_formed_ppc(ppc, gene_names, len(checked))


TRICKY = pd.DataFrame({
    "条件": np.array(["ctrl", "处理", "a/b"], dtype=object)[np.arange(N_CELLS) % 3],
    "cond[x]": np.random.default_rng(0).normal(size=N_CELLS),
    "donor": np.array([f"s{i}/x[1]" for i in np.arange(N_CELLS) * 6 // N_CELLS], dtype=object),
    "with space": np.array(["two words", "B"], dtype=object)[(np.arange(N_CELLS) * 6 // N_CELLS) % 2],
}, index=[f"c{i}" for i in range(N_CELLS)])


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
# Every kind of column at once: a cell-level factor, a slope, samples and a factor given per sample.
@example(case=(TRICKY, {"categorical": ["条件", "with space"], "continuous": ["cond[x]"], "reference": {"条件": "ctrl"},
                        "random": ["donor"]}, [["条件", "a/b", "处理"], ["with space", "two words", "B"]]))
def test_any_design_fits_to_well_formed_tables_or_stops_with_one_line_naming_the_column(case):
    obs, design, contrasts = case
    problems = expected_problems(obs, design, contrasts)
    note(f"design {design}, contrasts {contrasts}; expected problems: {problems}")
    with tempfile.TemporaryDirectory() as directory:
        try:
            design_fit_de_ppc(obs, design, contrasts, Path(directory))
        except InputError as error:
            note(f"InputError: {error}")
            assert problems, f"a valid design was refused: {error}"
            assert_one_line_naming(error, problems)
            event(f"InputError: {error.problem.split(' (')[0][-40:]}")
            return
    assert not problems, f"the design went through, though it must stop naming one of {problems}"
    event("fitted")


def workflow_config(path: str, design: dict, contrasts) -> dict:
    return {"backend": "jax", "datasets": {"fuzz": {
        "path": path, "design": design, "contrasts": contrasts, "de": {"pseudobulk": False},
        "inference": {"max_iterations": 20, "check_every": 10, "draws": 20},
        "ppc": {"cells": PPC_CELLS, "draws": PPC_DRAWS}}}}


@pytest.mark.slow
@settings(max_examples=2, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
@example(case=(TRICKY, {"categorical": ["条件"], "continuous": ["cond[x]"], "reference": {}, "random": []},
               [["条件", "a/b", "处理"]]))
def test_the_workflow_on_drawn_designs_writes_each_contrast_or_stops_with_one_line_naming_the_column(case):
    """The same property through Snakemake, obs and its odd names through an .h5ad and the config."""
    obs, design, contrasts = case
    names = {contrast_name(*parts): parts for parts in contrasts}
    colliding = len(names) < len({tuple(parts) for parts in contrasts})
    counts, _ = counts_and_depth(0)
    with tempfile.TemporaryDirectory() as directory:
        workdir = copy_workflow(Path(directory) / "scnbvi")
        path = workdir / "obs.h5ad"
        # A boolean column with a missing value is stored as the nullable boolean type of pandas.
        obs = obs.apply(lambda column: column.astype("boolean") if column.dtype == object
                        and column.dropna().map(type).eq(bool).all() and column.isna().any() else column)
        ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"g{g}" for g in range(N_GENES)])).write_h5ad(path)
        # What the workflow reads: string columns come back categorical.
        problems = expected_problems(ad.read_h5ad(path).obs, design, contrasts)
        note(f"design {design}, contrasts {contrasts}; expected problems: {problems}")
        result = snakemake(workdir, "--configfile", write_config(workdir, workflow_config(str(path), design,
                                                                                          contrasts)))
        text = result.stdout + result.stderr
        if colliding:  # two contrasts would write one file: refused before any job
            assert result.returncode != 0 and "config: datasets.fuzz.contrasts:" in text, text[-2000:]
            return
        if problems:
            assert result.returncode != 0, text[-2000:]
            lines = sorted({line for line in text.splitlines() if line.startswith("scnbvi error")})
            # Found from obs before any job, or else by the covariates rule.
            assert len(lines) == 1 and ("before any job" in lines[0] or "rule covariates" in lines[0]), text[-2000:]
            assert any(problem in lines[0] for problem in problems), (lines[0], problems)
            return
        assert result.returncode == 0, text[-3000:]
        for name in names:
            table = pd.read_csv(workdir / "results" / "fuzz" / "de" / f"{name}.tsv", sep="\t", index_col=0)
            assert_well_formed_contrast(table, [f"g{g}" for g in range(N_GENES)])
