"""File names the workflow derives from the config.

Only the standard library is imported here: common.smk imports this module in Snakemake's own
process, which need not have numpy or pandas."""

from __future__ import annotations

import re


def contrast_name(column, numerator, denominator) -> str:
    """A file-safe name, e.g. ``condition_treated_vs_control``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{column}_{numerator}_vs_{denominator}")
