"""Per-gene lengths and per-cell sequencing depth, turned into the log offsets of the model."""

import csv
import logging
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scnbvi.errors import InputError
from scnbvi.outputs import write_table

log = logging.getLogger("scnbvi")

GTF_COLUMNS = ["seqname", "source", "feature", "start", "end", "score", "strand", "frame", "attributes"]
DEPTH_SOURCES = ("obs", "total_counts", "constant")
IMPUTE_FIX = "add them to the table or set covariates.gene_length.source: impute"
MATCH_FIX = ("set covariates.gene_length.var_column to the adata.var column holding the file's gene names "
             "(for a GTF, or covariates.gene_length.attribute: gene_id or gene_name)")


def gene_lengths_from_table(path, var_names) -> np.ndarray:
    """Lengths from a two-column TSV (gene, length; header optional), in the order of `var_names`."""
    path = _existing_file(path)
    try:
        table = pd.read_csv(path, sep="\t", header=None, dtype=str, quoting=csv.QUOTE_NONE)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(path, "file", f"not a readable TSV ({error})", "write two tab-separated columns: gene, length") from error
    if table.shape[1] != 2:
        raise InputError(path, "columns", f"expected 2 columns (gene, length), found {table.shape[1]}",
                         "write two tab-separated columns: gene, length")
    table.columns = ["gene", "length"]
    if pd.isna(pd.to_numeric(table["length"].iloc[0], errors="coerce")):
        table = table.iloc[1:]  # the first row is a header
    lengths = pd.to_numeric(table["length"], errors="coerce")
    bad = ~np.isfinite(lengths) | (lengths <= 0)
    if bad.any():
        first = bad.to_numpy().argmax()
        raise InputError(
            path, "length", f"{int(bad.sum())} lengths are not positive, finite numbers "
            f"(first: gene {table['gene'].iloc[first]!r} = {table['length'].iloc[first]!r})",
            "give every gene a length in base pairs > 0",
        )
    lengths.index = table["gene"].to_numpy()
    duplicated = lengths.index[lengths.index.duplicated()]
    if len(duplicated):
        raise InputError(path, "gene", f"{len(duplicated)} genes appear more than once (first: {duplicated[0]!r})",
                         "keep one row per gene")
    return _aligned(lengths, var_names, path, "gene")


def gene_lengths_from_gtf(path, var_names, attribute="gene_id") -> np.ndarray:
    """Length of each gene as the union of its exons, so exons shared by transcripts count once."""
    path = _existing_file(path)
    try:
        gtf = pd.read_csv(
            path, sep="\t", comment="#", header=None, names=GTF_COLUMNS, usecols=["feature", "start", "end", "attributes"],
            dtype={"feature": str, "attributes": str}, quoting=csv.QUOTE_NONE, compression="infer",
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError, ValueError) as error:
        raise InputError(path, "file", f"not a readable GTF ({error})", "pass a GTF file (plain or .gz)") from error
    exons = gtf[gtf["feature"] == "exon"].copy()
    pattern = rf'(?:^|;)\s*{re.escape(attribute)}\s+"?([^";]+)"?'
    exons["gene"] = exons["attributes"].str.extract(pattern, expand=False)
    exons = exons.dropna(subset=["gene"])
    if exons.empty:
        raise InputError(path, attribute, f"no exon line has a {attribute!r} attribute",
                         "use a GTF with exon features, or set the attribute to gene_id or gene_name")
    exons["start"] = pd.to_numeric(exons["start"], errors="coerce")
    exons["end"] = pd.to_numeric(exons["end"], errors="coerce")
    bad = exons["start"].isna() | exons["end"].isna() | (exons["start"] < 1) | (exons["end"] < exons["start"])
    if bad.any():
        first = exons[bad].iloc[0]
        raise InputError(path, "start/end", f"{int(bad.sum())} exons have invalid coordinates "
                         f"(first: gene {first['gene']!r}, {first['start']}..{first['end']})",
                         "use 1-based inclusive coordinates with start <= end")
    return _aligned(_union_lengths(exons), var_names, path, attribute)


def gene_identifiers(adata: ad.AnnData, var_column=None, source="covariates.gene_length") -> pd.Index:
    """The names under which a length table or GTF lists the data's genes: var_names, or a var
    column when they differ (CELLxGENE files have Ensembl ids as var_names and symbols in
    var['feature_name']). A missing value matches no gene, so it is reported as missing."""
    if var_column is None:
        return pd.Index(adata.var_names)
    if var_column not in adata.var.columns:
        raise InputError(source, "var_column", f"adata.var has no column {var_column!r} "
                         f"(available: {list(adata.var.columns)})",
                         "set covariates.gene_length.var_column to one of them, or null to match var_names")
    return pd.Index([str(name) if pd.notna(name) else None for name in adata.var[var_column]], dtype=object)


def gene_lengths_from_var(adata: ad.AnnData, column: str, source) -> np.ndarray:
    """Lengths from a numeric ``adata.var`` column (many annotated .h5ad files carry one)."""
    field = f"var[{column!r}]"
    if column not in adata.var.columns:
        raise InputError(source, field, f"column not found (available: {list(adata.var.columns)})",
                         "set covariates.gene_length.column to one of them, or another gene_length source")
    lengths = pd.to_numeric(adata.var[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(lengths) | (lengths <= 0)
    if bad.any():
        raise InputError(source, field, f"{int(bad.sum())} genes have no positive length (first: {adata.var_names[bad.argmax()]!r})",
                         "fill them in, or set covariates.gene_length.source: impute")
    return lengths


def impute_gene_lengths(n_genes, seed) -> np.ndarray:
    """Plausible lengths (1-3 kb) when none are known, seeded so runs repeat."""
    return np.random.default_rng(seed).uniform(1000, 3000, n_genes)


def sequencing_depth(
    adata: ad.AnnData,
    *,
    source="total_counts",
    column="Bases",
    constant=10_000.0,
    seed=0,
    per_cell=True,
    src_name="covariates.depth",
) -> tuple[np.ndarray, int]:
    """Per-cell sequencing depth and how many cells had theirs imputed.

    Cells without counts have no usable total, but only matter when depth is used per cell;
    the scalar (median) depth of the original model tolerates them.
    """
    if source == "obs":
        return _depth_from_obs(adata, column, seed, src_name)
    if source == "total_counts":
        # The slice step records the total over all genes; a selection of genes would understate it.
        if "total_counts" in adata.obs:
            totals = adata.obs["total_counts"].to_numpy(dtype=np.float64)
        else:
            totals = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
        zero = totals <= 0
        if per_cell and zero.any():
            raise InputError(
                src_name, "X", f"{int(zero.sum())} cells have zero counts (first: {adata.obs_names[zero.argmax()]!r}), "
                "so their total is no depth", "drop them with load.zero_cells: drop, or set covariates.depth.per_cell: false",
            )
        return totals, 0
    if source == "constant":
        if not np.isfinite(constant) or constant <= 0:
            raise InputError(src_name, "constant", f"{constant!r} is not a positive number", "give a depth > 0")
        return np.full(adata.n_obs, float(constant)), 0
    raise InputError(src_name, "source", f"unknown source {source!r}", f"use one of {list(DEPTH_SOURCES)}")


def log_offsets(depth, lengths, *, per_cell=True, depth_ref=1e5, length_ref=2000.0) -> tuple[np.ndarray, np.ndarray]:
    """Log offsets log(s/s_ref) per cell and log(L/L_ref) per gene.

    Without `per_cell` every cell gets the median depth, as in the original model. Genes
    without a length (NaN: no length source) get no length offset.
    """
    depth = np.asarray(depth, dtype=np.float64)
    cell_depth = depth if per_cell else np.full(depth.shape, np.median(depth))
    lengths = np.asarray(lengths, dtype=np.float64)
    gene_log_offset = np.where(np.isnan(lengths), 0.0, np.log(np.where(np.isnan(lengths), 1.0, lengths) / length_ref))
    with np.errstate(divide="ignore"):
        return np.log(cell_depth / depth_ref), gene_log_offset


# exp(30) ~ 1e13: no depth or length is that many times its reference, while exp of an offset
# near 88 already overflows in float32.
MAX_ABS_LOG_OFFSET = 30.0


def require_finite_offsets(cells: pd.DataFrame, genes: pd.DataFrame, source="covariates") -> None:
    """Stop before fitting when an offset is not finite or absurdly large: the fit would diverge
    at its first step with advice (a smaller learning rate) that cannot help."""
    for table, field in ((cells, "depth"), (genes, "gene_length")):
        offsets = table["log_offset"].to_numpy()
        huge = np.isfinite(offsets) & (np.abs(offsets) > MAX_ABS_LOG_OFFSET)
        if huge.any():
            value = table.iloc[huge.argmax()]
            raise InputError(source, field, f"{int(huge.sum())} of {len(table)} rows are more than "
                             f"exp({MAX_ABS_LOG_OFFSET:g}) ~ 1e13 times their reference (first: {table.index[huge.argmax()]!r}, "
                             f"log offset {value['log_offset']:.4g})", f"fix the {field} values in their source")
    zero_depth = ~np.isfinite(cells["log_offset"].to_numpy())
    if zero_depth.any():
        first = cells.index[zero_depth.argmax()]
        raise InputError(
            source, "depth",
            f"{int(zero_depth.sum())} of {len(cells)} cells get a depth of 0, so no finite log offset "
            f"(first: {first!r}; with one scalar depth, the median is 0 when half the cells have no counts)",
            "drop cells without counts (load.zero_cells: drop or slice.drop_zero_cells: true), "
            "or use per-cell depth (covariates.depth.per_cell: true)",
        )
    bad_length = ~np.isfinite(genes["log_offset"].to_numpy())
    if bad_length.any():
        first = genes.index[bad_length.argmax()]
        raise InputError(source, "gene_length", f"{int(bad_length.sum())} genes have a length that gives no finite "
                         f"offset (first: {first!r} = {genes['length'].iloc[bad_length.argmax()]!r})",
                         "fix their lengths in the length source (positive, finite numbers)")


def covariate_tables(adata: ad.AnnData, settings: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cell table (depth, log offset) and gene table (length, log offset) of a data set,
    from the config's ``covariates`` section, indexed by cell and gene name. Gene length
    ``none`` (the default: UMI counts have no length bias) leaves the length empty."""
    lengths = settings["gene_length"]
    if lengths["source"] == "none":
        gene_length = np.full(adata.n_vars, np.nan)
    elif lengths["source"] == "table":
        gene_length = gene_lengths_from_table(lengths["path"], gene_identifiers(adata, lengths["var_column"]))
    elif lengths["source"] == "gtf":
        gene_length = gene_lengths_from_gtf(lengths["path"], gene_identifiers(adata, lengths["var_column"]),
                                            lengths["attribute"])
    elif lengths["source"] == "var":
        gene_length = gene_lengths_from_var(adata, lengths["column"], "covariates.gene_length")
    else:
        gene_length = impute_gene_lengths(adata.n_vars, settings["seed"])
    depth_settings = settings["depth"]
    depth, n_imputed = sequencing_depth(
        adata,
        source=depth_settings["source"],
        column=depth_settings["column"],
        constant=depth_settings["constant"],
        seed=settings["seed"],
        per_cell=depth_settings["per_cell"],
    )
    log.info("depth: %d of %d cells imputed", n_imputed, adata.n_obs)
    cell_log_offset, gene_log_offset = log_offsets(
        depth, gene_length, per_cell=depth_settings["per_cell"],
        depth_ref=settings["depth_ref"], length_ref=settings["length_ref"],
    )
    cells = pd.DataFrame({"depth": depth, "log_offset": cell_log_offset}, index=pd.Index(adata.obs_names, name="cell"))
    genes = pd.DataFrame({"length": gene_length, "log_offset": gene_log_offset},
                         index=pd.Index(adata.var_names, name="gene"))
    require_finite_offsets(cells, genes)
    return cells, genes


def write_covariates(cells: pd.DataFrame, genes: pd.DataFrame, cells_path, genes_path) -> None:
    """Write the two tables of ``covariate_tables`` as TSVs, each atomically."""
    write_table(cells, cells_path)
    write_table(genes, genes_path)


def read_covariates(cells_path, genes_path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the two tables written by `write_covariates`, indexed by cell and gene name (the
    cell table also holds the design's covariates, if any)."""
    return (_read_covariate_table(cells_path, "cell", ["depth", "log_offset"]),
            _read_covariate_table(genes_path, "gene", ["length", "log_offset"]))


def aligned_covariates(cells_path, genes_path, adata: ad.AnnData) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cell and gene covariate tables in the order of the count matrix; tables written for
    other data are an error."""
    cells, genes = read_covariates(cells_path, genes_path)
    for table, names, path, kind in ((cells, adata.obs_names, cells_path, "cell"), (genes, adata.var_names, genes_path, "gene")):
        if not table.index.equals(pd.Index(names)):
            raise InputError(path, kind, f"{kind} names differ from those of the count matrix", "rerun the covariates rule")
    return cells, genes


def _read_covariate_table(path, index_name, columns) -> pd.DataFrame:
    path = _existing_file(path)
    header = pd.read_csv(path, sep="\t", nrows=0).columns
    table = pd.read_csv(path, sep="\t", dtype={index_name: str}, float_precision="round_trip", keep_default_na=False,
                        na_values={name: [""] for name in header if name != index_name})
    missing = [name for name in [index_name, *columns] if name not in table.columns]
    if missing:
        raise InputError(path, "columns", f"missing columns {missing} (found {list(table.columns)})",
                         "rerun the covariates step")
    return table.set_index(index_name)


def _existing_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file", "file not found", "check the path in the config")
    return path


def _union_lengths(exons: pd.DataFrame) -> pd.Series:
    """Base pairs covered by each gene's exons (1-based inclusive), overlaps counted once.

    With exons sorted by start, an exon adds the bases beyond the furthest end seen so far in its gene.
    """
    exons = exons.sort_values(["gene", "start"], kind="stable")
    furthest_end = exons.groupby("gene", sort=False)["end"].cummax()
    previous_end = furthest_end.groupby(exons["gene"], sort=False).shift(1).fillna(0)
    new_bases = (exons["end"] - np.maximum(exons["start"] - 1, previous_end)).clip(lower=0)
    return new_bases.groupby(exons["gene"]).sum().astype(np.float64)


def _aligned(lengths: pd.Series, var_names, source, field) -> np.ndarray:
    """Lengths in the order of `var_names`; every gene of the data must be present."""
    var_names = pd.Index(var_names)
    missing = var_names[~var_names.isin(lengths.index)]
    if len(missing) == len(var_names):
        raise InputError(
            source, field,
            f"none of the {len(var_names)} genes of the data is in it (data: {list(var_names[:3])}, "
            f"file: {list(lengths.index[:3])})", MATCH_FIX,
        )
    if len(missing):
        raise InputError(
            source, field,
            f"{len(missing)} of {len(var_names)} genes of the data are missing (first: {list(missing[:5])})",
            IMPUTE_FIX,
        )
    return lengths.reindex(var_names).to_numpy(dtype=np.float64)


def _depth_from_obs(adata, column, seed, src_name) -> tuple[np.ndarray, int]:
    """Depth from an obs column; missing or non-positive values are imputed log-normally (seeded)."""
    field = f"obs[{column!r}]"
    if column not in adata.obs.columns:
        raise InputError(src_name, field, f"column not found (available: {list(adata.obs.columns)})",
                         "set covariates.depth.column to one of them, or covariates.depth.source: total_counts or constant")
    values = adata.obs[column]
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        raise InputError(src_name, field, f"column is not numeric (dtype {values.dtype})",
                         "use a numeric depth column, or set covariates.depth.source: total_counts or constant")
    depth = values.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    unusable = ~np.isfinite(depth) | (depth <= 0)
    n_imputed = int(unusable.sum())
    depth[unusable] = np.random.default_rng(seed).lognormal(10, 0.5, n_imputed)
    return depth, n_imputed
