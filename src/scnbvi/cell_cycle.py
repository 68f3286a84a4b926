"""Cell-cycle scores (S, G2/M) and phase per cell, so that the model's design can use them."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

from scnbvi.errors import InputError

log = logging.getLogger("scnbvi")

# scanpy scores a list against control genes of matched expression; a handful of genes gives a
# noisy score, so a list must have at least this many genes in the data (or all of a shorter list).
MIN_GENES = 10
LISTS = {"s_genes": "S-phase", "g2m_genes": "G2/M-phase"}


def read_gene_list(path) -> list[str]:
    """Gene names, one a line; blank lines and ``#`` comments are skipped so lists can be annotated."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file", "file not found", "check the path in the config")
    genes = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    genes = [gene for gene in genes if gene]
    if not genes:
        raise InputError(path, "file", "no gene names (only blank lines or comments)", "write one gene name per line")
    return genes


def cell_cycle_scores(
    adata: ad.AnnData,
    s_genes,
    g2m_genes,
    *,
    gene_symbols: str | None = None,
    seed: int = 0,
    source: str = "cell_cycle",
) -> pd.DataFrame:
    """``S_score``, ``G2M_score`` and ``phase`` (G1, S, G2M) per cell, indexed by ``obs_names``.

    Scored by ``sc.tl.score_genes_cell_cycle`` on a normalised, log1p copy of the raw counts in
    ``adata.X``; ``adata`` is left as it was. The lists name genes as ``var_names`` do, or as the
    ``adata.var[gene_symbols]`` column does (case-sensitive; a repeated symbol means its first gene).
    ``source`` is the config key prefix used in errors.
    """
    names = _gene_names(adata, gene_symbols, source)
    where = f"var[{gene_symbols!r}]" if gene_symbols else "var_names"
    position = {}
    for index, name in enumerate(names):
        if name is not None:
            position.setdefault(name, index)
    found, shortfalls = {}, []
    for key, genes in (("s_genes", s_genes), ("g2m_genes", g2m_genes)):
        genes = list(dict.fromkeys(genes))
        found[key] = [position[gene] for gene in genes if gene in position]
        missing = [gene for gene in genes if gene not in position]
        log.info("%s: %d of %d %s genes found in %s", key, len(found[key]), len(genes), LISTS[key], where)
        needed = min(MIN_GENES, len(genes)) or 1
        if len(found[key]) < needed:
            shortfalls.append((key, f"{len(found[key])} of {len(genes)} {LISTS[key]} genes found in {where}, "
                                    f"{needed} needed (first missing: {_first(missing)})"))
    if shortfalls:
        fix = (f"give lists that use the symbols of {where}, or set {source}.gene_symbols to the var column holding them"
               if gene_symbols else
               f"give lists that use the data's gene names, or set {source}.gene_symbols to the var column holding symbols")
        raise InputError(
            "config", " and ".join(f"{source}.{key}" for key, _ in shortfalls),
            " and ".join(problem for _, problem in shortfalls), fix,
        )

    # Positions as names: unique whatever var_names or the symbols hold, and every gene stays in the control pool.
    scored = ad.AnnData(
        X=adata.X.astype(np.float32),
        obs=pd.DataFrame(index=adata.obs_names.copy()),
        var=pd.DataFrame(index=[str(index) for index in range(adata.n_vars)]),
    )
    sc.pp.normalize_total(scored)
    sc.pp.log1p(scored)
    sc.tl.score_genes_cell_cycle(
        scored,
        s_genes=[str(index) for index in found["s_genes"]],
        g2m_genes=[str(index) for index in found["g2m_genes"]],
        random_state=seed,
    )
    table = pd.DataFrame(
        {
            "S_score": scored.obs["S_score"].astype(float).to_numpy(),
            "G2M_score": scored.obs["G2M_score"].astype(float).to_numpy(),
            "phase": scored.obs["phase"].astype(str).to_numpy(),
        },
        index=pd.Index(adata.obs_names, name="cell"),
    )
    log.info("phases: %s", table["phase"].value_counts().to_dict())
    return table


def _gene_names(adata: ad.AnnData, gene_symbols: str | None, source: str) -> list[str | None]:
    """The names the lists are matched against, one per gene (None: a gene without a symbol)."""
    if gene_symbols is None:
        return [str(name) for name in adata.var_names]
    if gene_symbols not in adata.var.columns:
        raise InputError(
            "config", f"{source}.gene_symbols", f"var column {gene_symbols!r} not found (available: {list(adata.var.columns)})",
            "name a var column holding gene symbols, or null to match var_names",
        )
    symbols = adata.var[gene_symbols]
    names = [None if pd.isna(symbol) else str(symbol) for symbol in symbols]
    named = pd.Series([name for name in names if name is not None], dtype=object)
    repeated = named[named.duplicated()].unique()
    if len(repeated):
        log.info("%d symbols of var[%r] name more than one gene (first: %r); each list entry uses the first such gene",
                 len(repeated), gene_symbols, repeated[0])
    return names


def _first(genes: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(gene) for gene in genes[:n])
    return f"[{shown}, ...]" if len(genes) > n else f"[{shown}]"
