"""Results of a run merged into the user's own AnnData: the one line a scanpy user needs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from scnbvi.errors import InputError

if TYPE_CHECKING:
    import anndata as ad

RESULT_FILE = "scnbvi.h5ad"


def merge(adata: ad.AnnData, results) -> ad.AnnData:
    """A copy of ``adata`` with the results of ``results`` (a data set's results folder, or its
    scnbvi.h5ad) joined on by name; ``adata`` itself is left as it was.

    Added: obs and var columns ``scnbvi_*`` (cells and genes that were not fitted get NaN),
    each contrast's table in ``varm["scnbvi_de_{name}"]`` and how the fit was made in
    ``uns["scnbvi"]``. Merging again replaces the earlier results. Every fitted cell and gene
    must be in ``adata``: results of other data are refused, naming how many are missing.
    """
    import anndata as ad  # here, not at import: `import scnbvi` stays free of the scientific stack

    path = Path(results)
    path = path / RESULT_FILE if path.is_dir() else path
    if not path.is_file():
        raise InputError(path, "file", "file not found", f"give a data set's results folder holding {RESULT_FILE}")
    result = ad.read_h5ad(path)
    for axis, fitted, names in (("obs", result.obs_names, adata.obs_names), ("var", result.var_names, adata.var_names)):
        missing = fitted.difference(names, sort=False)
        if len(missing):
            raise InputError(
                path, f"{axis}_names",
                f"{len(missing):,} of the {len(fitted):,} fitted names are not in your AnnData's {axis}_names "
                f"(e.g. {missing[0]!r})",
                f"merge into the AnnData that was fitted, with its names as loaded (names made unique at load "
                f"are in qc.json under renamed: call adata.{axis}_names_make_unique() first)",
            )
    merged = adata.copy()
    merged.obs = _joined(merged.obs, result.obs)
    merged.var = _joined(merged.var, result.var)
    for key, table in result.varm.items():
        merged.varm[key] = _text_as_categories(table.reindex(merged.var_names))
    merged.uns["scnbvi"] = result.uns["scnbvi"]
    return merged


def _joined(frame, results):
    """``frame`` with the result columns, replacing those of an earlier merge."""
    return _text_as_categories(frame.drop(columns=results.columns, errors="ignore").join(results), results.columns)


def _text_as_categories(frame, columns=None):
    """Text columns (gene symbols) as categories: rows without a result hold NaN among strings,
    which h5ad cannot write as text."""
    for name in frame.columns if columns is None else columns:
        if frame[name].dtype == object:
            frame[name] = frame[name].astype("category")
    return frame
