"""The package's plots: the ELBO curve, the MA and volcano plots of a contrast, the NUTS check and the
posterior predictive checks."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from adjustText import adjust_text  # noqa: E402

from scnbvi.inference.plateau import DecayThenStop, relative_gains  # noqa: E402


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Rolling median: robust to the heavy-tailed spikes of minibatch ELBO estimates."""
    return pd.Series(values).rolling(window, min_periods=1, center=True).median().to_numpy()


def plateau_checks(eval_elbo: np.ndarray, *, tolerance: float, patience: int, learning_rate_decay: float,
                   max_decays: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``elbo`` rule (:class:`DecayThenStop`) replayed on the checks' fixed-cells ELBO, because
    elbo.tsv does not record its decisions: the relative gain over ``patience`` checks (NaN before
    the first), and the checks at which a plateau shrank the learning rate."""
    rule = DecayThenStop(tolerance, patience, learning_rate_decay, max_decays)
    decays = []
    for check, value in enumerate(eval_elbo):
        taken = rule.decays
        if rule.update(value):
            break
        if rule.decays > taken:
            decays.append(check)
    gain = np.full(len(eval_elbo), np.nan)
    gain[patience:] = relative_gains(list(eval_elbo), patience)
    return gain, np.array(decays, dtype=int)


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


# The posterior predictive check's replicates: one data set of counts per posterior draw.
REPLICATED = "the replicated data sets (one per draw)"
# Genes above which the mean-variance plot shows a density rather than points.
DENSITY_ABOVE = 2000
# Genes named on the MA and volcano plots: the most certain calls, so the eye finds them first.
LABELLED_GENES = 10


def call_counts(table: pd.DataFrame, lfsr_level: float) -> tuple[int, int]:
    """Genes called up and down: lfsr below the level, by the sign of the shrunk log2 fold change."""
    called = table["lfsr"].to_numpy() < lfsr_level
    lfc = table["log2_fold_change"].to_numpy()
    return int((called & (lfc > 0)).sum()), int((called & (lfc < 0)).sum())


def top_calls(table: pd.DataFrame, lfsr_level: float, n: int = LABELLED_GENES) -> np.ndarray:
    """Row positions of the ``n`` called genes with the smallest lfsr, ties (common at lfsr ~ 0)
    broken by the larger |log2 fold change|."""
    lfsr, lfc = table["lfsr"].to_numpy(), table["log2_fold_change"].to_numpy()
    called = np.flatnonzero(lfsr < lfsr_level)
    return called[np.lexsort((-np.abs(lfc[called]), lfsr[called]))[:n]]


def gene_names(table: pd.DataFrame, rows: np.ndarray) -> list[str]:
    """The genes at ``rows`` by their ``symbol`` where the table has one (an Ensembl id means
    little on a plot), by the index otherwise."""
    names = table.index[rows].astype(str).to_list()
    if "symbol" not in table:
        return names
    symbols = table["symbol"].iloc[rows].to_list()
    return [str(symbol).strip() if pd.notna(symbol) and str(symbol).strip() else name
            for symbol, name in zip(symbols, names)]


def contrast_figures(table: pd.DataFrame, *, title: str, lfsr_level: float = 0.05, lfc_threshold: float = 0.0):
    """The MA plot (log2 fold change against mean expression) and the volcano plot (against lfsr)
    of one contrast, as open figures: called genes (lfsr below ``lfsr_level``) highlighted, the
    thresholds drawn, the top calls named and the numbers of up and down calls in the title."""
    called = table["lfsr"].to_numpy() < lfsr_level
    lfc = table["log2_fold_change"].to_numpy()
    up, down = call_counts(table, lfsr_level)
    headline = f"{up:,} up, {down:,} down at lfsr < {lfsr_level:g}"
    labelled = top_calls(table, lfsr_level)
    labels = gene_names(table, labelled)
    panels = (
        (False, np.log10(table["base_mean"].to_numpy() + 1e-3), lfc, "log10 base mean", "log2 fold change"),
        # Shown down to 1e-16 (float64 resolution): smaller rates are all certain signs.
        (True, lfc, -np.log10(np.maximum(table["lfsr"].to_numpy(), 1e-16)), "log2 fold change", "-log10 lfsr"),
    )
    figures = []
    for volcano, x, y, x_label, y_label in panels:
        fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
        ax.scatter(x[~called], y[~called], s=4, color="0.6", lw=0, label="other genes")
        ax.scatter(x[called], y[called], s=6, color="C3", lw=0,
                   label=f"lfsr < {lfsr_level:g} ({int(called.sum()):,} of {len(table):,} genes)")
        threshold_line = ax.axvline if volcano else ax.axhline
        for sign in (-1, 1) if lfc_threshold > 0 else ():
            threshold_line(sign * lfc_threshold, color="0.3", ls=":", lw=0.8,
                           label=f"|log2 fold change| = {lfc_threshold:g}" if sign > 0 else None)
        if volcano:
            ax.axhline(-np.log10(lfsr_level), color="C3", ls="--", lw=0.8, label=f"lfsr = {lfsr_level:g}")
        else:
            ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(f"{title}\n{headline}", fontsize=10)
        ax.legend(loc="best", fontsize=8, frameon=False)
        texts = [ax.text(x[row], y[row], name, fontsize=7) for row, name in zip(labelled, labels)]
        if texts:
            adjust_text(texts, x=x[labelled], y=y[labelled], ax=ax,
                        arrowprops={"arrowstyle": "-", "color": "0.3", "lw": 0.5})
        figures.append(fig)
    return tuple(figures)


def plot_contrast(table: pd.DataFrame, out_ma, out_volcano, *, title: str, lfsr_level: float = 0.05,
                  lfc_threshold: float = 0.0):
    """The MA and volcano plots of one contrast (:func:`contrast_figures`) written to their files."""
    ma, volcano = contrast_figures(table, title=title, lfsr_level=lfsr_level, lfc_threshold=lfc_threshold)
    for fig, path in ((ma, out_ma), (volcano, out_volcano)):
        fig.savefig(path, dpi=120)
        plt.close(fig)


def plot_ppc_zero_fraction(genes: pd.DataFrame, out_path, *, title: str, band: float = 0.9):
    """Each gene's observed zero fraction against the one its replicates predict, with the
    replicates' central band; genes outside it are highlighted. Points along the diagonal fit."""
    outside = genes["zero_fraction_outside"].to_numpy(dtype=bool)
    predicted, observed = genes["zero_fraction_predicted"].to_numpy(), genes["zero_fraction_observed"].to_numpy()
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    ax.vlines(predicted, genes["zero_fraction_low"], genes["zero_fraction_high"], color="0.75", lw=1,
              label=f"{round(100 * band)} % band of the replicates")
    ax.plot([0, 1], [0, 1], color="0.3", lw=0.8, ls="--")
    ax.scatter(predicted[~outside], observed[~outside], s=6, color="C0", lw=0, label="observed, inside the band")
    ax.scatter(predicted[outside], observed[outside], s=8, color="C3", lw=0,
               label=f"observed, outside the band ({int(outside.sum())} of {len(genes)} genes)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("predicted zero fraction (mean of the replicates)")
    ax.set_ylabel("observed zero fraction")
    ax.set_title(f"observed zero fraction vs its {round(100 * band)} % band over {REPLICATED}\n{title}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_ppc_mean_variance(genes: pd.DataFrame, out_path, *, alpha: float, title: str):
    """Each gene's variance against its mean over cells, observed and replicated (with the
    replicates' band), and the model's curve var = mu + mu^2 / alpha at the median dispersion
    (and Poisson's var = mu): the differences between cells lift both sets of points above the
    curve, so misfit is where the observed points leave the replicated ones.

    Above ``DENSITY_ABOVE`` genes, points hide one another: the observed genes are drawn as a
    density (hexagons) and the replicated ones as the median and band per bin of mean."""
    mean, variance = genes["mean_observed"].to_numpy(), genes["variance_observed"].to_numpy()
    predicted_mean, predicted_variance = genes["mean_predicted"].to_numpy(), genes["variance_predicted"].to_numpy()
    low, high = np.maximum(genes["variance_low"], 1e-12).to_numpy(), np.maximum(genes["variance_high"], 1e-12).to_numpy()
    positive = (mean > 0) & (variance > 0)
    outside = genes["variance_outside"].to_numpy(dtype=bool) & positive
    fig, ax = plt.subplots(figsize=(6.8 if positive.sum() > DENSITY_ABOVE else 6, 5), layout="constrained")
    if positive.sum() > DENSITY_ABOVE:
        density = ax.hexbin(mean[positive], variance[positive], xscale="log", yscale="log", gridsize=60, bins="log",
                            cmap="Blues", mincnt=1, lw=0)
        fig.colorbar(density, ax=ax, label="observed genes per hexagon")
        centres, band = binned_band(predicted_mean, predicted_variance, low, high)
        ax.fill_between(centres, band["low"], band["high"], color="0.45", alpha=0.25, lw=0,
                        label="replicated variance, band (median per bin)")
        ax.plot(centres, band["value"], color="0.3", lw=1.2, label="replicated (median per bin of mean)")
        ax.scatter(mean[outside], variance[outside], s=3, color="C3", lw=0,
                   label=f"observed, variance outside the band ({int(outside.sum()):,} of {len(genes):,} genes)")
    else:
        ax.vlines(predicted_mean, low, high, color="0.75", lw=1, label="replicated variance, band")
        ax.scatter(predicted_mean, predicted_variance, s=5, color="0.45", lw=0, label="replicated (mean of the draws)")
        ax.scatter(mean[positive & ~outside], variance[positive & ~outside], s=6, color="C0", lw=0, label="observed")
        ax.scatter(mean[outside], variance[outside], s=8, color="C3", lw=0,
                   label=f"observed, variance outside the band ({int(outside.sum())} of {len(genes)} genes)")
    values = np.concatenate([mean[positive], predicted_mean[predicted_mean > 0]])
    if len(values):
        mu = np.geomspace(values.min(), values.max(), 200)
        ax.plot(mu, mu + mu**2 / alpha, color="C1", lw=1.2, label=f"NB: var = mu + mu^2 / alpha, alpha = {alpha:.3g}")
        ax.plot(mu, mu, color="0.3", lw=0.8, ls="--", label="Poisson: var = mu")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean count per cell")
    ax.set_ylabel("variance over cells")
    ax.set_title(f"observed variance against mean vs {REPLICATED}\n{title}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def binned_band(mean: np.ndarray, value: np.ndarray, low: np.ndarray, high: np.ndarray,
                bins: int = 30) -> tuple[np.ndarray, pd.DataFrame]:
    """Medians of ``value``, ``low`` and ``high`` in bins of log mean (genes with a positive mean),
    at the bins' centres: the replicated genes as a line and a band where points would be a block."""
    keep = mean > 0
    edges = np.geomspace(mean[keep].min(), mean[keep].max() * (1 + 1e-9), bins + 1)
    frame = pd.DataFrame({"value": value[keep], "low": low[keep], "high": high[keep]})
    medians = frame.groupby(np.digitize(mean[keep], edges) - 1).median()
    return np.sqrt(edges[:-1] * edges[1:])[medians.index], medians


def plot_ppc_library_size(histogram: pd.DataFrame, out_path, *, title: str, band: float = 0.9):
    """Histogram of the checked cells' library sizes (log10 scale), observed against the
    replicates' mean and central band per bin."""
    centres = (histogram["log10_low"] + histogram["log10_high"]).to_numpy() / 2
    width = (histogram["log10_high"] - histogram["log10_low"]).to_numpy()
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    ax.bar(centres, histogram["observed"], width=width, color="C0", alpha=0.5, label="observed")
    ax.fill_between(centres, histogram["low"], histogram["high"], step="mid", color="C1", alpha=0.3,
                    label=f"replicated, {round(100 * band)} % band")
    ax.step(centres, histogram["predicted"], where="mid", color="C1", lw=1.2, label="replicated, mean")
    ax.set_xlabel("log10(library size + 1)")
    ax.set_ylabel("cells")
    ax.set_title(f"observed library sizes vs their {round(100 * band)} % band over {REPLICATED}\n{title}",
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_nuts_check(table: pd.DataFrame, out_path, *, title: str, mass: float = 0.9):
    """Per quantity group, ADVI's sd over NUTS's (1 = same width) and the NUTS posterior mass
    inside ADVI's central interval (``mass`` = calibrated); flagged groups in red."""
    groups = table.index.to_list()
    y = np.arange(len(groups))[::-1]
    colours = np.where(table["flagged"].to_numpy(dtype=bool), "C3", "C0")
    fig, axes = plt.subplots(1, 2, figsize=(9, 1.2 + 0.28 * len(groups)), sharey=True, layout="constrained")
    panels = (
        (axes[0], table["sd_ratio"].to_numpy(), 1.0, "sd ratio (ADVI / NUTS, median)"),
        (axes[1], table["nuts_mass_in_advi_interval"].to_numpy(), mass,
         f"NUTS mass inside ADVI's {round(100 * mass)} % interval"),
    )
    for ax, values, target, label in panels:
        ax.axvline(target, color="0.3", ls="--", lw=0.8)
        ax.scatter(values, y, s=18, c=colours, lw=0)
        ax.set_xlabel(label)
    axes[0].set_xscale("log")
    axes[1].set_xlim(-0.02, 1.02)
    axes[0].set_yticks(y, groups, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
