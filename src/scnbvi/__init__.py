"""scnbvi: hierarchical Negative-Binomial model of single-cell counts, fitted by minibatch ADVI."""

import importlib

__version__ = "0.1.0"

# Names loaded on first use, so that `import scnbvi` (the workflow's own process does) stays free of
# the scientific stack.
LAZY = {"merge": "merging"}

__all__ = ["__version__", *LAZY]


def __getattr__(name: str):
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{LAZY[name]}"), name)
    globals()[name] = value
    return value
