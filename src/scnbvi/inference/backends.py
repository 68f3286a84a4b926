"""Compute backends: which engine runs each, whether it can run here, and its PyTensor mode."""

from __future__ import annotations

import pytensor

from scnbvi.errors import BackendUnavailableError

BACKENDS = ("c", "py", "numba", "jax")


def engine_for(backend: str) -> str:
    """The engine that runs a backend: JAX has its own loop, the rest go through ``pm.fit``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "jax" if backend == "jax" else "pymc"


def require_backend(backend: str) -> None:
    """Fail early, with what is missing, when a backend cannot run on this machine."""
    engine_for(backend)
    if backend == "c" and not pytensor.config.cxx:
        raise BackendUnavailableError(
            "backend 'c' needs a C++ compiler (g++) and none was found on this machine; "
            "install one or set backend: py (pure-Python linker, slower)"
        )
    if backend in ("numba", "jax"):
        try:
            __import__(backend)
        except ImportError as err:
            raise BackendUnavailableError(
                f"backend {backend!r} needs the Python package {backend!r}, which is not "
                f"installed ({err}); install it or choose backend c or py"
            ) from err


def pytensor_mode(backend: str):
    """The PyTensor compile mode of a backend's PyTensor functions."""
    if backend == "py":
        # Without fusion each elementwise op is one vectorised NumPy call; fused composites
        # would run element by element in Python.
        return pytensor.compile.mode.Mode(linker="py", optimizer="fast_run").excluding("fusion")
    if backend == "numba":
        return "NUMBA"
    if backend == "jax":
        return pytensor.compile.mode.Mode(linker="py", optimizer="fast_compile")
    return "FAST_RUN"

