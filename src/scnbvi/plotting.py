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


def plateau_checks(eval_elbo: np.ndarray, *, tolerance: float, patience: int, learning_rate_decay: float,
                   max_decays: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``elbo`` rule (scnbvi.inference.plateau.DecayThenStop) replayed on the checks'
    fixed-cells ELBO, because elbo.tsv does not record its decisions and the plot's environment
    has no PyMC to import the rule from: the relative gain over ``patience`` checks, and the
    checks at which a plateau shrank the learning rate."""
    gain = np.full(len(eval_elbo), np.nan)
    gain[patience:] = (eval_elbo[patience:] - eval_elbo[:-patience]) / np.abs(eval_elbo[patience:])
    plateaus = np.flatnonzero(gain < tolerance)
    return gain, plateaus[: max_decays if learning_rate_decay < 1 else 0]


def plot_elbo(elbo: pd.DataFrame, out_path, *, stats: dict, n_observations: int, title: str = ""):
    """ELBO per observation (cell x gene) against iteration, so that fits of any size read alike.

    The first steps can be orders of magnitude worse than the rest, so the y range is set from
    the later part of the curve; the full history stays in elbo.tsv. With the ``elbo`` rule, a
    second panel shows what the rule judges: the fixed-cells ELBO's relative gain over
    ``patience`` checks against ``tolerance`` on a log axis, with the checks at which a plateau
    shrank the learning rate.
    """
    iteration = elbo["iteration"].to_numpy()
    value = -elbo["loss"].to_numpy() / n_observations
    window = max(5, len(value) // 100)
    checks = elbo.dropna(subset=["eval_elbo"]) if "eval_elbo" in elbo else elbo.iloc[:0]
    judged = stats.get("convergence") == "elbo" and len(checks) > 0
    fig, axes = plt.subplots(2 if judged else 1, 1, figsize=(9, 6.5 if judged else 4.5), sharex=True,
                             squeeze=False, height_ratios=[3, 2] if judged else None, layout="constrained")
    ax = axes[0, 0]
    ax.plot(iteration, value, color="0.75", lw=0.5, label="minibatch ELBO")
    ax.plot(iteration, smooth(value, window), color="C0", lw=1.5, label=f"rolling median ({window} steps)")
    if len(checks):
        ax.plot(checks["iteration"], checks["eval_elbo"] / n_observations, "o-", color="C2", ms=3, lw=1,
                label="fixed-cells ELBO (convergence checks)")
    if judged:
        rule = {key: stats[key] for key in ("tolerance", "patience", "learning_rate_decay", "max_decays")}
        gain, decays = plateau_checks(checks["eval_elbo"].to_numpy(), **rule)
        at = checks["iteration"].to_numpy()
        rate = stats["learning_rate"]
        for check in decays:
            rate *= stats["learning_rate_decay"]
            for axis in axes[:, 0]:
                axis.axvline(at[check], color="C4", ls=":", lw=1.2,
                             label=f"plateau: learning rate to {rate:.3g}" if axis is ax else None)
        gains = axes[1, 0]
        rose, fell = gain > 0, gain <= 0
        gains.plot(at[rose], gain[rose], "o", color="C2", ms=4, label="ELBO rose by")
        # A log axis shows a fall by its size; an unchanged ELBO sits at the bottom.
        gains.plot(at[fell], np.maximum(-gain[fell], 1e-12), "o", mfc="none", color="C3", ms=4,
                   label="ELBO fell by")
        gains.axhline(stats["tolerance"], color="0.3", ls="--", lw=1, label=f"tolerance {stats['tolerance']:g}")
        gains.set_yscale("log")
        gains.set_ylabel(f"relative change over\n{stats['patience']} checks")
        gains.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    converged = bool(stats["converged"])
    for axis in axes[:, 0]:
        axis.axvline(iteration[-1], color="C1" if converged else "C3", ls="--", lw=1,
                     label=f"{'converged' if converged else 'stopped, not converged,'} at {iteration[-1]:,}"
                     if axis is ax else None)
    settled = smooth(value, window)[len(value) // 20 :]
    low, high = np.nanquantile(settled, 0.01), np.nanmax(value[len(value) // 20 :])
    margin = 0.1 * (high - low) or 1.0
    ax.set_ylim(low - margin, high + margin)
    ax.set_ylabel("ELBO per observation\n(cell x gene)")
    axes[-1, 0].set_xlabel("iteration")
    ax.set_title(title or stats["stop_reason"], fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
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
