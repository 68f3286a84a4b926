"""The design: obs columns turned into per-cell covariates whose effects are fitted per gene.

Categorical columns get one indicator per non-reference level (the reference is the most
frequent level unless configured), continuous columns are standardised. Everything a fit
cannot identify (a missing column, a single level, missing values, one column confounded with
another) is rejected here, before any fitting.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scnbvi.errors import InputError
from scnbvi.outputs import write_json


@dataclass(frozen=True)
class Design:
    """Covariates of each cell (``matrix``: cells x coefficients) and what they mean."""

    matrix: np.ndarray
    names: tuple[str, ...]
    # categorical column -> (reference level, non-reference levels in coefficient order)
    factors: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    # continuous column -> (mean, sd) used to standardise it
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def n_coefficients(self) -> int:
        return len(self.names)

    def table(self, cell_names) -> pd.DataFrame:
        return pd.DataFrame(self.matrix, index=pd.Index(cell_names, name="cell"), columns=list(self.names))

    def contrast_weights(self, column: str, numerator: str, denominator: str, source="contrasts") -> np.ndarray:
        """Weights w with log fold change (numerator vs denominator) = beta_g . w for each gene."""
        if column not in self.factors:
            raise InputError("config", source, f"{column!r} is not a categorical design column "
                             f"(design has {sorted(self.factors) or 'none'})",
                             "name a column listed under design.categorical")
        reference, levels = self.factors[column]
        weights = np.zeros(self.n_coefficients)
        for level, sign in ((numerator, 1.0), (denominator, -1.0)):
            if level == reference:
                continue
            if level not in levels:
                raise InputError("config", source, f"{level!r} is not a level of {column!r} "
                                 f"(levels: {[reference, *levels]})", "use one of these levels")
            weights[self.names.index(coefficient_name(column, level))] += sign
        if numerator == denominator:
            raise InputError("config", source, f"compares {numerator!r} with itself", "name two different levels")
        return weights


def contrast_name(column, numerator, denominator) -> str:
    """A file-safe name, e.g. ``condition_treated_vs_control``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{column}_{numerator}_vs_{denominator}")


def coefficient_name(column: str, level) -> str:
    return f"{column}[{level}]"


def build_design(obs: pd.DataFrame, *, categorical=(), continuous=(), reference=None, source="design") -> Design:
    """The design of ``obs`` for the named columns; ``reference`` maps a categorical column to
    its reference level (default: the most frequent level, ties broken by sort order)."""
    reference = dict(reference or {})
    unknown = sorted(set(reference) - set(categorical))
    if unknown:
        raise InputError("config", f"{source}.reference", f"{unknown} not listed under {source}.categorical",
                         "add them to design.categorical or remove their reference")
    repeated = sorted({c for c in [*categorical, *continuous] if [*categorical, *continuous].count(c) > 1})
    if repeated:
        raise InputError("config", source, f"columns {repeated} are named more than once", "name each column once")
    columns, names, factors, scales = [], [], {}, {}
    for column in categorical:
        values = _column(obs, column, source).astype(str)
        counts = values.value_counts()
        if len(counts) < 2:
            raise InputError("config", f"{source}.categorical", f"obs[{column!r}] has one level only "
                             f"({counts.index[0]!r}), so its effect is not identified",
                             "remove the column from the design, or fit cells with more than one level")
        ranked = sorted(counts.index, key=lambda level: (-counts[level], level))
        base = str(reference.get(column, ranked[0]))
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
    design = Design(matrix, tuple(names), factors, scales)
    _require_identified(design, obs, categorical, source)
    return design


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
        raise InputError("config", source, f"the design columns {list(design.names)} are linearly dependent "
                         "(one is a combination of the others), so their effects are not identified",
                         "remove one of the dependent columns")


def design_from_config(obs: pd.DataFrame, settings: dict, contrasts=(), source="design") -> Design:
    """The design named by the config's ``design`` section; every contrast is checked against
    it here, so a contrast naming an unknown level stops before any fitting."""
    design = build_design(obs, categorical=settings["categorical"], continuous=settings["continuous"],
                          reference=settings["reference"], source=source)
    for index, contrast in enumerate(contrasts):
        design.contrast_weights(*(str(part) for part in contrast), source=f"contrasts[{index}]")
    return design


def write_design(design: Design, path) -> None:
    """What the coefficients mean (the matrix itself goes into the cell covariates table)."""
    write_json({"names": list(design.names), "factors": {c: [ref, list(levels)] for c, (ref, levels) in design.factors.items()},
                "scales": {c: list(scale) for c, scale in design.scales.items()}}, path)


def read_design(path, cells: pd.DataFrame) -> Design:
    """The design written by :func:`write_design`, its matrix from the cell covariates table."""
    meta = json.loads(Path(path).read_text())
    missing = [name for name in meta["names"] if name not in cells.columns]
    if missing:
        raise InputError(path, "names", f"coefficients {missing} are not columns of the cell covariates",
                         "rerun the covariates rule")
    return Design(
        cells[meta["names"]].to_numpy(dtype=np.float64) if meta["names"] else np.zeros((len(cells), 0)),
        tuple(meta["names"]),
        {column: (ref, tuple(levels)) for column, (ref, levels) in meta["factors"].items()},
        {column: tuple(scale) for column, scale in meta["scales"].items()},
    )
