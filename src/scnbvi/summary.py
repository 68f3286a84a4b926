"""Tables a user reads: the ArviZ summary, a per-gene table that joins onto ``adata.var``, and
the AnnData of results that joins onto the user's own object."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from scnbvi.inference import InferenceSettings
from scnbvi.trace import posterior_statistics, trace_group

if TYPE_CHECKING:
    import arviz as az

# In scnbvi.h5ad every column carries it, so that joining onto a user's obs and var (which
# often hold total_counts, depth or the design columns already) never clashes.
COLUMN_PREFIX = "scnbvi_"
DE_PREFIX = f"{COLUMN_PREFIX}de_"  # each contrast's table in varm: scnbvi_de_{name}
CODE_KEYS = ("scnbvi_version", "scnbvi_source_hash", "git_commit")


def posterior_summary(idata: az.InferenceData) -> pd.DataFrame:
    """``az.summary(kind="stats")`` of every global, per-gene and per-coefficient variable, over
    every draw: from the statistics the fit wrote, so a trace that keeps fewer per-gene draws
    gives the same table (same rows, labels and columns as ``az.summary``).

    Per-cell variables are left out: at atlas scale they were nearly every row and most of the
    time (186,224 cells: 44 MB, 3.5 minutes); their mean and sd for every cell are in cells.tsv.
    Variational draws are independent by construction, so chain diagnostics (R-hat, ESS) say
    nothing here; the summary keeps the statistics only.
    """
    posterior = trace_group(idata, "posterior")
    names = [name for name, variable in posterior.data_vars.items() if "cell" not in variable.dims]
    statistics = posterior_statistics(idata)
    columns = list(statistics["statistic"].values)
    frames = []
    for name in names:
        # Whole arrays at once: row by row, as az.summary labels them, took most of a minute at 39,241 genes.
        variable = statistics[name].transpose("statistic", ...)
        dims = variable.dims[1:]
        labels = [name]
        if dims:
            grids = np.meshgrid(*(variable[dim].values for dim in dims), indexing="ij")
            labels = [f"{name}[{', '.join(map(str, parts))}]" for parts in zip(*(grid.ravel() for grid in grids))]
        values = variable.values.reshape(len(columns), -1).T.astype(np.float64)
        frames.append(pd.DataFrame(values, index=labels, columns=columns))
    return pd.concat(frames)


def gene_table(idata: az.InferenceData, counts: pd.DataFrame, symbols: pd.Series | None = None) -> pd.DataFrame:
    """One row per gene of ``counts`` (``qc.gene_counts``: total counts and cells expressing, indexed
    like ``adata.var``), so ``adata.var.join(table)`` just works; ``symbols`` (from
    ``load.gene_symbols``, indexed by gene) become the first column, ``symbol``.
    Means and sds are over every draw (the fit's statistics), the sds with ddof 0."""
    statistics = posterior_statistics(idata)
    draws = statistics.attrs["draws"]
    # The statistics' sd is az.summary's (ddof 1); the table's has always been xarray's (ddof 0).
    ddof0 = np.sqrt((draws - 1) / draws)

    def mean_and_sd(name):
        return statistics[name].sel(statistic="mean").values, statistics[name].sel(statistic="sd").values * ddof0

    table = pd.DataFrame(index=pd.Index(list(counts.index), name="gene"))
    table["log_expression_mean"], table["log_expression_sd"] = mean_and_sd("gene_effect")
    if symbols is not None:
        table.insert(0, "symbol", symbols.reindex(table.index).to_numpy())
    if "dispersion" in statistics:
        # Named as the field does: DESeq2, edgeR and glmGamPoi's dispersion is 1/alpha
        # (Var = mu + dispersion mu^2); scvi-tools' theta is alpha itself, an inverse dispersion.
        table["dispersion_mean"], table["dispersion_sd"] = mean_and_sd("dispersion")
        table["inverse_dispersion_mean"], table["inverse_dispersion_sd"] = mean_and_sd("alpha")
    if "beta" in statistics:
        beta_mean = statistics["beta"].sel(statistic="mean").transpose("gene", "coefficient").values
        beta_sd = statistics["beta"].sel(statistic="sd").transpose("gene", "coefficient").values * ddof0
        columns = {}
        for position, name in enumerate(statistics["coefficient"].values):
            columns[f"beta_{name}_mean"], columns[f"beta_{name}_sd"] = beta_mean[:, position], beta_sd[:, position]
        table = pd.concat([table, pd.DataFrame(columns, index=table.index)], axis=1)
    for column in counts.columns:
        table[column] = counts[column].to_numpy(dtype=np.int64)
    return table


def fit_record(
    fit_stats: dict, inference: dict, model: dict, design: dict, qc: dict, trace_attrs: dict
) -> dict:
    """How the results were made, by section: the ``inference`` settings as the fit ran with
    them (fit_stats.json's effective value where it has one, else the configured one), the
    ``model`` section, the ``design`` (design.json), ``convergence`` (the rest of
    fit_stats.json: engine, steps, epochs, converged, stop_reason, timings), package
    ``versions``, the ``code_version`` of the fit and the ``qc`` report (qc.json)."""
    settings = [*inference, *(key for key in InferenceSettings.__dataclass_fields__ if key not in inference)]
    code = {key: fit_stats[key] for key in CODE_KEYS}
    return {
        "inference": {key: fit_stats.get(key, inference.get(key)) for key in settings
                      if key in fit_stats or key in inference},
        "model": dict(model),
        "design": design,
        "convergence": {key: value for key, value in fit_stats.items() if key not in settings and key not in code},
        "versions": {key: value for key, value in trace_attrs.items() if key.startswith("version_")},
        "code_version": code,
        "qc": qc,
    }


def result_anndata(
    cells: pd.DataFrame, genes: pd.DataFrame, record: dict, contrasts: dict[str, pd.DataFrame] | None = None
) -> ad.AnnData:
    """The fitted cells and genes with their results and no counts (``X`` is None).

    ``obs`` holds cells.tsv and ``var`` genes.tsv, every column prefixed ``scnbvi_``,
    ``varm[f"scnbvi_de_{name}"]`` each contrast's table (de/{name}.tsv) in the order of the genes,
    and ``uns["scnbvi"]`` the :func:`fit_record`.
    """
    obs, var = cells.add_prefix(COLUMN_PREFIX), genes.add_prefix(COLUMN_PREFIX)
    obs.index, var.index = obs.index.astype(str), var.index.astype(str)
    varm = {}
    for name, table in (contrasts or {}).items():
        varm[f"{DE_PREFIX}{name}"] = table.set_axis(table.index.astype(str)).reindex(var.index)
    return ad.AnnData(obs=obs, var=var, varm=varm, uns={"scnbvi": hdf5_safe(record)})


def hdf5_safe(value):
    """``value`` in a form anndata writes to HDF5 and reads back as written: dicts and lists of
    one scalar type as such (an empty list as an empty array of strings), anything else (mixed
    lists, keys holding '/') as JSON text."""
    if isinstance(value, dict):
        if all(isinstance(key, str) and "/" not in key for key in value):
            return {key: hdf5_safe(item) for key, item in value.items()}
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        kinds = {type(item) for item in value}
        if not kinds:
            return np.array([], dtype=str)
        if kinds in ({str}, {bool}) or kinds <= {int, float}:
            return np.asarray(value)
        return json.dumps(value)
    return value
