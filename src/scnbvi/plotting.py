"""The ELBO curve: raw minibatch loss, a smoothed line and the point where the fit stopped."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Rolling median: robust to the heavy-tailed spikes of minibatch ELBO estimates."""
    return pd.Series(values).rolling(window, min_periods=1, center=True).median().to_numpy()


def plot_elbo(elbo: pd.DataFrame, out_path, *, converged: bool, stop_reason: str, title: str = ""):
    """Plot ELBO (= -loss) against iteration.

    The first steps can be orders of magnitude worse than the rest, so the y range is set from
    the later part of the curve; the full history stays in elbo.tsv.
    """
    iteration = elbo["iteration"].to_numpy()
    value = -elbo["loss"].to_numpy()
    window = max(5, len(value) // 100)
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    ax.plot(iteration, value, color="0.75", lw=0.5, label="minibatch ELBO")
    ax.plot(iteration, smooth(value, window), color="C0", lw=1.5, label=f"rolling median ({window} steps)")
    if "eval_elbo" in elbo and elbo["eval_elbo"].notna().any():
        checks = elbo.dropna(subset=["eval_elbo"])
        ax.plot(checks["iteration"], checks["eval_elbo"], "o-", color="C2", ms=3, lw=1, label="fixed-cells ELBO (convergence check)")
    marker = "converged" if converged else "stopped (not converged)"
    ax.axvline(iteration[-1], color="C3" if not converged else "C1", ls="--", lw=1)
    ax.annotate(f"{marker} at {iteration[-1]:,}", xy=(iteration[-1], 1), xycoords=("data", "axes fraction"),
                ha="right", va="top", fontsize=9)
    settled = smooth(value, window)[len(value) // 20 :]
    low, high = np.nanquantile(settled, 0.01), np.nanmax(value[len(value) // 20 :])
    margin = 0.1 * (high - low) or 1.0
    ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("iteration")
    ax.set_ylabel("ELBO")
    ax.set_title(title or stop_reason, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_contrast(table: pd.DataFrame, out_ma, out_volcano, *, title: str, lfsr_level: float = 0.05):
    """MA plot (log2 fold change against mean expression) and volcano plot (against lfsr) of
    one contrast; genes with lfsr below ``lfsr_level`` are highlighted."""
    called = table["lfsr"].to_numpy() < lfsr_level
    lfc = table["log2_fold_change"].to_numpy()
    label = f"lfsr < {lfsr_level:g} ({int(called.sum())} of {len(table)} genes)"
    panels = (
        (out_ma, np.log10(table["base_mean"].to_numpy() + 1e-3), lfc, "log10 base mean", "log2 fold change"),
        # Shown down to 1e-16 (float64 resolution): smaller rates are all certain signs.
        (out_volcano, lfc, -np.log10(np.maximum(table["lfsr"].to_numpy(), 1e-16)), "log2 fold change", "-log10 lfsr"),
    )
    for path, x, y, x_label, y_label in panels:
        fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
        ax.scatter(x[~called], y[~called], s=4, color="0.6", lw=0, label="other genes")
        ax.scatter(x[called], y[called], s=6, color="C3", lw=0, label=label)
        if path == out_ma:
            ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title, fontsize=10)
        ax.legend(loc="best", fontsize=8, frameon=False)
        fig.savefig(path, dpi=120)
        plt.close(fig)
