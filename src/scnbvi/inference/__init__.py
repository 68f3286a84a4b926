"""Mean-field ADVI of the model, with two interchangeable engines.

``pymc`` runs ``pm.fit`` on a PyTensor backend (``c``, ``numba`` or the pure-Python ``py``
linker); ``jax`` compiles the same model's log density to JAX and drives ADVI in jitted optax
loops. Both take the same effective settings, stream minibatches from a sparse matrix, share
the stopping rule and return the same :class:`FitResult`, so everything downstream is
engine-agnostic. PyMC and PyTensor are imported only when a name that needs them is first used,
so the settings, the stopping rule and the result load without them. One concept per module:

- ``settings``: requested and effective settings
- ``result``: the fit's result
- ``backends``: which engine runs a backend, whether it can run here
- ``memory``: the memory estimate that refuses runs that cannot fit
- ``initialization``: start values of q
- ``plateau``: the learning-rate-decay-then-stop rule and the parameter-change rule
- ``averaging``: iterate averaging
- ``progress``: log lines
- ``elbo``: parameter layout, entropies, fixed draws, the full-data ELBO
- ``divergence``: the error of a non-finite loss
- ``checkpoint``: saving and resuming a running fit
- ``loop``: the fit loop both engines run (chunks, checks, decays, stop, averaging, progress, checkpoints)
- ``jax_graph``: the PyTensor graph as JAX functions
- ``jax_objective``: the jax engine's minibatch ELBO and the Newton refit of a block's cells
- ``closing_sweep``: the jax engine's last refit of every cell
- ``pymc_engine``, ``jax_engine``: the engines, ``run(model, sampler, settings, backend, checkpoint)``
- ``hyperparameters``: the hyperparameters' sds with the effects they govern integrated out
- ``advi``: ``fit``
"""

import importlib

from scnbvi.inference.result import FitResult
from scnbvi.inference.settings import InferenceSettings

# Names whose modules import PyMC or PyTensor, loaded on first use.
LAZY = {
    "fit": "advi",
    "BACKENDS": "backends",
    "engine_for": "backends",
    "pytensor_mode": "backends",
    "require_backend": "backends",
    "ParameterLayout": "elbo",
    "full_data_elbo": "elbo",
}

__all__ = ["FitResult", "InferenceSettings", *LAZY]


def __getattr__(name: str):
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{LAZY[name]}"), name)
