"""The fit step as one call: files in, posterior, ELBO history and fit statistics out."""

from __future__ import annotations

import json
import logging
from dataclasses import fields

import anndata as ad
import numpy as np
import pandas as pd

from scnbvi.covariates import read_covariates
from scnbvi.outputs import atomic_output
from scnbvi.errors import InputError
from scnbvi.inference import InferenceSettings, fit
from scnbvi.posterior import draw_posterior

log = logging.getLogger("scnbvi")


def inference_settings(config: dict) -> InferenceSettings:
    """Settings from the config's ``inference`` section (keys the fit does not use are ignored)."""
    known = {f.name for f in fields(InferenceSettings)}
    return InferenceSettings(**{key: value for key, value in config.items() if key in known})


def aligned_offsets(adata: ad.AnnData, cells: pd.DataFrame, genes: pd.DataFrame, cells_path, genes_path):
    """Offsets in the order of the count matrix; a covariate table from other data is an error."""
    for table, names, path, kind in ((cells, adata.obs_names, cells_path, "cell"), (genes, adata.var_names, genes_path, "gene")):
        if not table.index.equals(pd.Index(names)):
            raise InputError(path, kind, f"{kind} names differ from those of the count matrix", "rerun the covariates rule")
    return cells["log_offset"].to_numpy(), genes["log_offset"].to_numpy()


def fit_dataset(*, counts_path, cells_path, genes_path, inference: dict, model: dict, backend: str,
                trace_path, elbo_path, stats_path) -> None:
    adata = ad.read_h5ad(counts_path)
    cells, genes = read_covariates(cells_path, genes_path)
    cell_log_offset, gene_log_offset = aligned_offsets(adata, cells, genes, cells_path, genes_path)
    settings = inference_settings(inference)
    log.info("fitting %d cells x %d genes with backend %s, %s", adata.n_obs, adata.n_vars, backend, settings)
    pymc_model, result = fit(
        adata.X,
        cell_log_offset,
        gene_log_offset,
        settings,
        backend=backend,
        gene_dispersion=model["gene_dispersion"],
        cell_names=adata.obs_names,
        gene_names=adata.var_names,
    )
    result.attrs.update(
        minibatch=settings.minibatch,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        gene_dispersion=int(model["gene_dispersion"]),
    )
    idata = draw_posterior(pymc_model, result, settings.draws, settings.seed)
    write_elbo(result, elbo_path)
    with atomic_output(stats_path) as path:
        path.write_text(json.dumps(fit_statistics(result), indent=2) + "\n")
    with atomic_output(trace_path) as path:
        idata.to_netcdf(str(path))


def write_elbo(result, path) -> None:
    """Loss per iteration, plus the convergence checks' fixed-cells ELBO where one was taken."""
    table = pd.DataFrame({"iteration": np.arange(1, len(result.losses) + 1), "loss": result.losses})
    checks = dict(result.checks)
    table["eval_elbo"] = table["iteration"].map(checks)
    with atomic_output(path) as temporary:
        table.to_csv(temporary, sep="\t", index=False)


def fit_statistics(result) -> dict:
    return {
        "engine": result.engine,
        "backend": result.backend,
        "steps": result.steps,
        "epochs": result.epochs,
        "converged": result.converged,
        "stop_reason": result.stop_reason,
        "fit_seconds": result.fit_seconds,
        "compile_seconds": result.compile_seconds,
        "ms_per_step": 1000 * result.fit_seconds / max(result.steps, 1),
        "final_eval_elbo": result.checks[-1][1] if result.checks else None,
    }
