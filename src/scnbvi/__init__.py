"""scnbvi: hierarchical Negative-Binomial model of single-cell counts, fitted by minibatch ADVI."""

import importlib

__version__ = "0.1.0"

# Names loaded on first use, so that `import scnbvi` (the workflow's own process does) stays free of
# the scientific stack: scnbvi.merge is the function of the module of the same name.
LAZY = {"merge": "merge"}

__all__ = ["__version__", *LAZY]


def __getattr__(name: str):
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{LAZY[name]}"), name)
    # Importing the module set the package's attribute to it; the function takes its place.
    globals()[name] = value
    return value
