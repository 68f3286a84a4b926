"""The design: obs columns turned into per-cell covariates whose effects are fitted per gene.

Categorical columns get one indicator per non-reference level (the reference is the most
frequent level unless configured), continuous columns are standardised. Everything a fit
cannot identify (a missing column, a single level, missing values, one column confounded with
another) is rejected here, before any fitting.

With a sample column (``design.random``), each sample gets its own effect per gene in the fit,
and the columns constant within every sample (a condition given per donor) move to the sample
level, where their effects are estimated from the samples (:mod:`scnbvi.samples`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scnbvi.errors import InputError
from scnbvi.outputs import write_json

# More levels than this in a categorical design column are warned about.
MANY_LEVELS = 50


@dataclass(frozen=True)
class SampleDesign:
    """The samples and their covariates (``matrix``: samples x sample-level coefficients)."""

    column: str
    # Every sample; the first is the reference, the one without an indicator in the cells' design.
    levels: tuple[str, ...]
    matrix: np.ndarray
    names: tuple[str, ...]
    factors: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def indicator_names(self) -> list[str]:
        return [coefficient_name(self.column, level) for level in self.levels[1:]]

    def at_level(self, column: str, level: str) -> np.ndarray:
        """The samples at ``level`` of a sample-level categorical column."""
        reference, levels = self.factors[column]
        return _indicator_rows(self.matrix, self.names, column, reference, levels, level)


@dataclass(frozen=True)
class Design:
    """Covariates of each cell (``matrix``: cells x coefficients) and what they mean."""

    matrix: np.ndarray
    names: tuple[str, ...]
    # categorical column -> (reference level, non-reference levels in coefficient order)
    factors: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    # continuous column -> (mean, sd) used to standardise it
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)
    # The sample column and its covariates, when samples are random effects.
    samples: SampleDesign | None = None

    @property
    def n_coefficients(self) -> int:
        return len(self.names)

    def table(self, cell_names) -> pd.DataFrame:
        return pd.DataFrame(self.matrix, index=pd.Index(cell_names, name="cell"), columns=list(self.names))

    @property
    def n_sample_coefficients(self) -> int:
        """The samples' indicators, the design's last columns."""
        return 0 if self.samples is None else len(self.samples.levels) - 1

    def is_sample_level(self, column: str) -> bool:
        """Whether the column's contrasts are replicated by samples rather than by cells."""
        return self.samples is not None and column in self.samples.factors

    def contrast_weights(self, column: str, numerator: str, denominator: str, source="contrasts") -> np.ndarray:
        """Weights w with log fold change (numerator vs denominator) = beta_g . w for each gene;
        for a sample-level column, over the sample-level coefficients instead."""
        if self.is_sample_level(column):
            return _level_weights(self.samples.factors, self.samples.names, column, numerator, denominator, source)
        return _level_weights(self.factors, self.names, column, numerator, denominator, source)

    def sample_indicator_positions(self) -> list[int]:
        """Where the samples' indicators (``samples.levels`` after the reference) lie among the coefficients."""
        return [self.names.index(name) for name in self.samples.indicator_names]

    def sample_of_cells(self) -> np.ndarray:
        """Each cell's position in ``samples.levels``."""
        indicators = self.matrix[:, self.sample_indicator_positions()]
        return (indicators @ np.arange(1, indicators.shape[1] + 1)).round().astype(np.int64)

    def level_mask(self, column: str, level: str) -> np.ndarray:
        """The cells at ``level`` of a categorical design column (the reference: no other level)."""
        if self.is_sample_level(column):
            return self.samples.at_level(column, level)[self.sample_of_cells()]
        reference, levels = self.factors[column]
        return _indicator_rows(self.matrix, self.names, column, reference, levels, level)

    def level_of_cells(self, column: str) -> np.ndarray:
        """Each cell's level of a categorical design column, cell- or sample-level alike."""
        reference, levels = (self.samples.factors if self.is_sample_level(column) else self.factors)[column]
        level = np.full(len(self.matrix), reference, dtype=object)
        for name in levels:
            level[self.level_mask(column, name)] = name
        return level


def _level_weights(factors, names, column, numerator, denominator, source) -> np.ndarray:
    if column not in factors:
        raise InputError("config", source, f"{column!r} is not a categorical design column "
                         f"(design has {sorted(factors) or 'none'})",
                         "name a column listed under design.categorical")
    reference, levels = factors[column]
    weights = np.zeros(len(names))
    for level, sign in ((numerator, 1.0), (denominator, -1.0)):
        if level == reference:
            continue
        if level not in levels:
            raise InputError("config", source, f"{level!r} is not a level of {column!r} "
                             f"(levels: {[reference, *levels]})", "use one of these levels")
        weights[names.index(coefficient_name(column, level))] += sign
    if numerator == denominator:
        raise InputError("config", source, f"compares {numerator!r} with itself", "name two different levels")
    return weights


def _indicator_rows(matrix, names, column, reference, levels, level) -> np.ndarray:
    indicators = [matrix[:, names.index(coefficient_name(column, name))] > 0.5 for name in levels]
    if level == reference:
        return ~np.any(indicators, axis=0) if indicators else np.ones(len(matrix), bool)
    return indicators[levels.index(level)]


def coefficient_name(column: str, level) -> str:
    return f"{column}[{level}]"


def build_design(obs: pd.DataFrame, *, categorical=(), continuous=(), reference=None, random=(),
                 source="design") -> Design:
    """The design of ``obs`` for the named columns; ``reference`` maps a categorical column to
    its reference level (default: the most frequent level, ties broken by sort order).
    ``random`` names at most one sample column: see :class:`SampleDesign`."""
    reference = dict(reference or {})
    categorical, continuous, random = list(categorical), list(continuous), list(random)
    unknown = sorted(set(reference) - set(categorical))
    if unknown:
        raise InputError("config", f"{source}.reference", f"{unknown} not listed under {source}.categorical",
                         "add them to design.categorical or remove their reference")
    named = [*categorical, *continuous, *random]
    repeated = sorted({c for c in named if named.count(c) > 1})
    if repeated:
        raise InputError("config", source, f"columns {repeated} are named more than once", "name each column once")
    if len(random) > 1:
        raise InputError("config", f"{source}.random", f"names {len(random)} columns; one sample column is supported",
                         "name the column of the replicating unit (donor, animal, well) only")
    if not random:
        matrix, names, factors, scales = _columns(obs, categorical, continuous, reference, source)
        design = Design(matrix, tuple(names), factors, scales)
        _require_identified(design, obs, categorical, source)
        return design
    samples = _column(obs, random[0], f"{source}.random").astype(str)
    nested = [c for c in [*categorical, *continuous] if _constant_within(_column(obs, c, source), samples)]
    cell_categorical = [c for c in categorical if c not in nested]
    cell_continuous = [c for c in continuous if c not in nested]
    matrix, names, factors, scales = _columns(obs, cell_categorical, cell_continuous, reference, source)
    sample_design = _sample_design(obs, samples, random[0], [c for c in categorical if c in nested],
                                   [c for c in continuous if c in nested], reference, source)
    indicators = [(samples == level).to_numpy(dtype=np.float64) for level in sample_design.levels[1:]]
    matrix = np.column_stack([matrix, *indicators])
    design = Design(matrix, (*names, *sample_design.indicator_names), factors, scales, sample_design)
    _require_identified(design, obs, cell_categorical, source)
    return design


def _columns(obs, categorical, continuous, reference, source):
    """Indicator columns of the categorical columns' non-reference levels, then the continuous
    columns standardised: (matrix, names, factors, scales)."""
    columns, names, factors, scales = [], [], {}, {}
    for column in categorical:
        values = _column(obs, column, source).astype(str)
        counts = values.value_counts()
        _require_few_levels(column, len(counts), len(values), source)
        if len(counts) < 2:
            raise InputError("config", f"{source}.categorical", f"obs[{column!r}] has one level only "
                             f"({counts.index[0]!r}), so its effect is not identified",
                             "remove the column from the design, or fit cells with more than one level")
        base = str(reference.get(column, _most_frequent(counts)))
        if base not in counts.index:
            raise InputError("config", f"{source}.reference.{column}", f"{base!r} is not a level of obs[{column!r}] "
                             f"(levels: {sorted(counts.index)})", "name one of these levels")
        levels = tuple(sorted(level for level in counts.index if level != base))
        factors[column] = (base, levels)
        for level in levels:
            columns.append((values == level).to_numpy(dtype=np.float64))
            names.append(coefficient_name(column, level))
    for column in continuous:
        values = _column(obs, column, source)
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise InputError("config", f"{source}.continuous", f"obs[{column!r}] is not numeric (dtype {values.dtype})",
                             "list it under design.categorical, or name a numeric column")
        numbers = values.to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(numbers)):
            raise InputError("config", f"{source}.continuous", f"obs[{column!r}] has non-finite values",
                             "fill or drop those cells (slice.obs_filters), or remove the column")
        sd = float(numbers.std())
        if sd == 0:
            raise InputError("config", f"{source}.continuous", f"obs[{column!r}] has one value only, so its "
                             "effect is not identified", "remove the column from the design")
        scales[column] = (float(numbers.mean()), sd)
        columns.append((numbers - numbers.mean()) / sd)
        names.append(column)
    matrix = np.column_stack(columns) if columns else np.zeros((len(obs), 0))
    return matrix, names, factors, scales


def _require_few_levels(column, levels: int, rows: int, source) -> None:
    """One coefficient per gene and level: a column with a level for every few cells (a
    barcode, a well) costs a coefficient per level and informs none of them."""
    if levels <= MANY_LEVELS:
        return
    if levels > rows // 10:
        raise InputError("config", source, f"obs[{column!r}] has {levels} levels for {rows} cells, fewer than 10 "
                         "cells each, so each level's per-gene effect is barely informed",
                         "remove it from the design; if its levels are samples (donors, wells) of more than 10 "
                         "cells each, name it under design.random; else group its levels")
    logging.getLogger("scnbvi.progress").warning(
        "obs[%r] has %d levels, %d coefficients per gene (fit time grows with them)%s", column, levels, levels - 1,
        "" if source.endswith("random") else "; if its levels are samples (donors, wells), name it under design.random")


def _most_frequent(counts: pd.Series) -> str:
    return sorted(counts.index, key=lambda level: (-counts[level], level))[0]


def _constant_within(values: pd.Series, groups: pd.Series) -> bool:
    return bool((values.astype(str).groupby(groups.to_numpy(), observed=True).nunique() == 1).all())


def _sample_design(obs, samples, column, categorical, continuous, reference, source) -> SampleDesign:
    """One row per sample (the reference sample first) with its sample-level covariates; the
    samples must outnumber those covariates, or their spread cannot be estimated."""
    counts = samples.value_counts()
    _require_few_levels(column, len(counts), len(samples), f"{source}.random")
    if len(counts) < 3:
        raise InputError("config", f"{source}.random", f"obs[{column!r}] has {len(counts)} samples; a sample "
                         "effect needs at least 3", "name a column with more samples, or remove design.random")
    first = _most_frequent(counts)
    levels = (first, *sorted(level for level in counts.index if level != first))
    per_sample = obs.groupby(samples.to_numpy(), observed=True)[[*categorical, *continuous]].first().loc[list(levels)]
    matrix, names, factors, scales = _columns(per_sample, categorical, continuous, reference, source)
    with_intercept = np.column_stack([np.ones(len(levels)), matrix])
    if len(levels) - np.linalg.matrix_rank(with_intercept) < 1:
        raise InputError("config", f"{source}.random", f"{len(levels)} samples of obs[{column!r}] leave no "
                         f"spread between samples to estimate once {names} are fitted",
                         "fit more samples, or fewer columns that are constant within samples")
    return SampleDesign(column, levels, matrix, tuple(names), factors, scales)


def _column(obs: pd.DataFrame, column: str, source) -> pd.Series:
    if column not in obs.columns:
        raise InputError("config", source, f"obs has no column {column!r} (available: {list(obs.columns)})",
                         "name an existing obs column (cell-cycle scores need the cell_cycle section)")
    values = obs[column]
    if values.isna().any():
        raise InputError("config", source, f"obs[{column!r}] has {int(values.isna().sum())} missing values "
                         f"(first: cell {values.index[values.isna().to_numpy().argmax()]!r})",
                         "fill them, drop those cells with slice.obs_filters, or remove the column")
    return values


def _require_identified(design: Design, obs: pd.DataFrame, categorical, source) -> None:
    """Reject confounded columns: a level of one column that picks exactly the cells of a level
    of another (their effects cannot be told apart), or any other linear dependence."""
    for i, first in enumerate(categorical):
        for second in categorical[i + 1 :]:
            crossed = pd.crosstab(obs[first].astype(str), obs[second].astype(str))
            for level_a, row in crossed.iterrows():
                only = row[row > 0]
                if len(only) == 1 and crossed[only.index[0]].sum() == row.sum():
                    raise InputError(
                        "config", f"{source}.categorical",
                        f"obs[{first!r}] == {level_a!r} and obs[{second!r}] == {only.index[0]!r} are the same "
                        "cells, so the two columns' effects are confounded",
                        f"keep only one of {first!r} and {second!r} in the design",
                    )
    with_intercept = np.column_stack([np.ones(len(design.matrix)), design.matrix])
    if np.linalg.matrix_rank(with_intercept) < with_intercept.shape[1]:
        for outer, inner in nested_pairs(obs[list(categorical)], categorical):
            raise InputError(
                "config", f"{source}.categorical",
                f"obs[{outer!r}] is nested in obs[{inner!r}] (constant within each level of obs[{inner!r}]), "
                f"so their effects are confounded: {inner!r} looks like the samples that replicate {outer!r}",
                f"move {inner!r} from design.categorical to design.random, so {outer!r} and its contrasts "
                "(differential expression) are estimated from the spread between samples",
            )
        raise InputError("config", source, f"the design columns {list(design.names)} are linearly dependent "
                         "(one is a combination of the others), so their effects are not identified",
                         "remove one of the dependent columns")


def nested_pairs(obs: pd.DataFrame, columns) -> list[tuple[str, str]]:
    """(outer, inner) for every named column ``outer`` constant within each level of another
    obs column ``inner`` that has more levels: samples nesting a condition. Only columns of at
    most a tenth as many levels as cells count as samples (a cell barcode nests everything)."""
    pairs = []
    candidates = [c for c in obs.columns if not pd.api.types.is_float_dtype(obs[c])
                  and 2 < obs[c].nunique() <= max(len(obs) // 10, 3)]
    for outer in columns:
        for inner in candidates:
            if inner != outer and obs[inner].nunique() > obs[outer].nunique() and not obs[inner].isna().any() \
                    and _constant_within(obs[outer], obs[inner].astype(str)):
                pairs.append((outer, inner))
    return pairs


def design_from_config(obs: pd.DataFrame, settings: dict, contrasts=(), source="design") -> Design:
    """The design named by the config's ``design`` section; every contrast is checked against
    it here, so a contrast naming an unknown level stops before any fitting."""
    design = build_design(obs, categorical=settings["categorical"], continuous=settings["continuous"],
                          reference=settings["reference"], random=settings.get("random", ()), source=source)
    if design.samples is None:
        for outer, inner in nested_pairs(obs, settings["categorical"]):
            logging.getLogger("scnbvi.progress").warning(
                "obs[%r] is constant within each level of obs[%r] (%d levels): if those are samples (donors, "
                "animals, wells), cells are not independent replicates of %r and its calls will be mostly "
                "differences between samples; name it under design.random", outer, inner, obs[inner].nunique(), outer)
    for index, contrast in enumerate(contrasts):
        design.contrast_weights(*(str(part) for part in contrast), source=f"contrasts[{index}]")
    return design


def write_design(design: Design, path) -> None:
    """What the coefficients mean (the matrix itself goes into the cell covariates table; the
    samples' small matrix is kept here)."""
    meta = {"names": list(design.names), **_levels_and_scales(design)}
    if design.samples is not None:
        samples = design.samples
        meta["samples"] = {"column": samples.column, "levels": list(samples.levels), "names": list(samples.names),
                           "matrix": samples.matrix.tolist(), **_levels_and_scales(samples)}
    write_json(meta, path)


def _levels_and_scales(design) -> dict:
    return {"factors": {c: [ref, list(levels)] for c, (ref, levels) in design.factors.items()},
            "scales": {c: list(scale) for c, scale in design.scales.items()}}


def _factors_and_scales(meta: dict) -> tuple[dict, dict]:
    return ({column: (ref, tuple(levels)) for column, (ref, levels) in meta["factors"].items()},
            {column: tuple(scale) for column, scale in meta["scales"].items()})


def read_design(path, cells: pd.DataFrame) -> Design:
    """The design written by :func:`write_design`, its matrix from the cell covariates table."""
    meta = json.loads(Path(path).read_text())
    missing = [name for name in meta["names"] if name not in cells.columns]
    if missing:
        raise InputError(path, "names", f"coefficients {missing} are not columns of the cell covariates",
                         "rerun the covariates rule")
    samples = None
    if "samples" in meta:
        sample_meta = meta["samples"]
        matrix = np.asarray(sample_meta["matrix"], dtype=np.float64).reshape(len(sample_meta["levels"]), -1)
        samples = SampleDesign(sample_meta["column"], tuple(sample_meta["levels"]), matrix,
                               tuple(sample_meta["names"]), *_factors_and_scales(sample_meta))
    return Design(
        cells[meta["names"]].to_numpy(dtype=np.float64) if meta["names"] else np.zeros((len(cells), 0)),
        tuple(meta["names"]),
        *_factors_and_scales(meta),
        samples,
    )
