"""Mean-field ADVI of the model, with two interchangeable engines.

``pymc`` runs ``pm.fit`` on a PyTensor backend (``c``, ``numba`` or the pure-Python ``py``
linker); ``jax`` compiles the same model's log density to JAX and drives ADVI in jitted optax
loops. Both take the same effective settings, stream minibatches from a sparse matrix, share
the stopping rule and return the same :class:`FitResult`, so everything downstream is
engine-agnostic. One concept per module:

- ``settings``: requested and effective settings, the fit's result
- ``backends``: which engine runs a backend, whether it can run here
- ``memory``: the memory estimate that refuses runs that cannot fit
- ``initialization``: start values of q
- ``plateau``: the learning-rate-decay-then-stop rule and the parameter-change rule
- ``averaging``: iterate averaging
- ``progress``: log lines
- ``elbo``: parameter layout, entropies, fixed draws, the full-data ELBO
- ``divergence``: the error of a non-finite loss
- ``checkpoint``: saving and resuming a running fit
- ``jax_graph``: the PyTensor graph as JAX functions
- ``pymc_engine``, ``jax_engine``: the engines, ``run(model, sampler, settings, backend, checkpoint)``
- ``hyperparameters``: the hyperparameters' sds with the effects they govern integrated out
- ``advi``: ``fit``
"""

from scnbvi.inference.advi import fit
from scnbvi.inference.backends import BACKENDS, engine_for, pytensor_mode, require_backend
from scnbvi.inference.elbo import ParameterLayout, full_data_elbo
from scnbvi.inference.settings import FitResult, InferenceSettings

__all__ = [
    "BACKENDS",
    "FitResult",
    "InferenceSettings",
    "ParameterLayout",
    "engine_for",
    "fit",
    "full_data_elbo",
    "pytensor_mode",
    "require_backend",
]
