"""Tables a user reads: the ArviZ summary and a per-gene table that joins onto ``adata.var``."""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd
import scipy.sparse as sp


def posterior_summary(idata: az.InferenceData) -> pd.DataFrame:
    """``az.summary`` of every parameter and effect.

    Variational draws are independent by construction, so chain diagnostics (R-hat, ESS) say
    nothing here; the summary keeps the statistics only.
    """
    return az.summary(idata, kind="stats", round_to="none")


def gene_table(idata: az.InferenceData, counts: sp.spmatrix, var_names) -> pd.DataFrame:
    """One row per gene, indexed like ``adata.var``, so ``adata.var.join(table)`` just works."""
    posterior = idata.posterior
    gene_effect = posterior["gene_effect"].stack(sample=("chain", "draw"))
    table = pd.DataFrame(
        {
            "log_expression_mean": gene_effect.mean("sample").values,
            "log_expression_sd": gene_effect.std("sample").values,
        },
        index=pd.Index(list(var_names), name="gene"),
    )
    alpha = posterior["alpha"]
    if "gene" in alpha.dims:
        alpha = alpha.stack(sample=("chain", "draw"))
        table["dispersion_mean"] = alpha.mean("sample").values
        table["dispersion_sd"] = alpha.std("sample").values
    if "beta" in posterior:
        beta = posterior["beta"].stack(sample=("chain", "draw"))
        for name in beta["coefficient"].values:
            table[f"beta_{name}_mean"] = beta.sel(coefficient=name).mean("sample").values
            table[f"beta_{name}_sd"] = beta.sel(coefficient=name).std("sample").values
    table["total_counts"] = np.asarray(counts.sum(axis=0)).ravel().astype(np.int64)
    table["n_cells_expressed"] = np.asarray((counts > 0).sum(axis=0)).ravel().astype(np.int64)
    return table
