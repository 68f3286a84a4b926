"""XLA's compiled programs kept on disk, for every process that compiles with JAX (the fit, the
predictive check): a rerun on the same data skips compilation."""

from __future__ import annotations

import os
from pathlib import Path


def use_compilation_cache() -> None:
    """Keep XLA's compiled programs on disk, as PyTensor keeps its C: a rerun of a fit on the
    same data (after a change of settings, say) skips compilation, several seconds of it, and
    the predictive check's half second.
    ``JAX_COMPILATION_CACHE_DIR`` picks the place; by default the user's cache directory.
    JAX keeps by default only programs that took a second or more to compile: the fit's
    programs each take less on small data, and together most of a warm start's compile time
    (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` still sets the threshold)."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scnbvi" / "jax"
        jax.config.update("jax_compilation_cache_dir", str(cache))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
