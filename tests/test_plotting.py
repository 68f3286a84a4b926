"""The plots a biologist reads: the MA and volcano plots name the top calls and count them, the
posterior predictive check's plots draw at any size, and the report's tables are pages that parse."""

from __future__ import annotations

from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from scnbvi.plotting import (
    contrast_figures,
    plot_contrast,
    plot_ppc_library_size,
    plot_ppc_mean_variance,
    plot_ppc_zero_fraction,
)
from scnbvi.report_tables import html_table, write_html_table


def de_table(n_genes: int = 60, seed: int = 0) -> pd.DataFrame:
    """A DE table as scnbvi.de writes it (the columns the plots read), sorted by lfsr."""
    rng = np.random.default_rng(seed)
    lfc = rng.normal(0, 1.5, n_genes)
    lfsr = np.clip(np.exp(-np.abs(lfc) * 3) + rng.uniform(0, 0.02, n_genes), 0, 0.5)
    table = pd.DataFrame({"base_mean": rng.gamma(2, 5, n_genes), "log2_fold_change": lfc, "lfsr": lfsr},
                         index=pd.Index([f"ENSG{i:05d}" for i in range(n_genes)], name="gene"))
    return table.sort_values("lfsr")


def texts_of(fig) -> list[str]:
    return [text.get_text() for text in fig.axes[0].texts]


def test_top_calls_are_named_by_symbol_where_the_table_has_one():
    table = de_table()
    # Ties at lfsr 0 are broken by the larger |log2 fold change|.
    table.iloc[:12, table.columns.get_loc("lfsr")] = 0.0
    expected = table.iloc[:12]["log2_fold_change"].abs().sort_values(ascending=False).index[:10]
    table["symbol"] = [f"SYM{i}" for i in range(len(table))]
    table.loc[expected[0], "symbol"] = np.nan
    ma, volcano = contrast_figures(table, title="sim", lfsr_level=0.05, lfc_threshold=0.5)
    names = [expected[0], *(table.loc[gene, "symbol"] for gene in expected[1:])]
    assert texts_of(ma) == texts_of(volcano) == names
    plt.close("all")


def test_top_calls_are_named_by_the_index_without_a_symbol_column():
    table = de_table()
    called = table[table["lfsr"] < 0.05]
    ma, _ = contrast_figures(table, title="sim", lfsr_level=0.05)
    assert len(called) > 10
    assert texts_of(ma) == called.sort_values("lfsr").index[:10].to_list()
    plt.close("all")


def test_titles_count_the_calls_up_and_down_and_the_thresholds_are_drawn():
    table = de_table(200)
    called = table["lfsr"] < 0.05
    up = int((called & (table["log2_fold_change"] > 0)).sum())
    down = int((called & (table["log2_fold_change"] < 0)).sum())
    assert up and down
    ma, volcano = contrast_figures(table, title="sim treated vs control", lfsr_level=0.05, lfc_threshold=1.0)
    for fig in (ma, volcano):
        assert fig.axes[0].get_title() == f"sim treated vs control\n{up} up, {down} down at lfsr < 0.05"
    ma_levels = {line.get_ydata()[0] for line in ma.axes[0].lines}
    assert {-1.0, 1.0, 0.0} <= ma_levels
    vertical = {line.get_xdata()[0] for line in volcano.axes[0].lines if line.get_xdata()[0] == line.get_xdata()[1]}
    horizontal = [line.get_ydata()[0] for line in volcano.axes[0].lines if line.get_ydata()[0] == line.get_ydata()[1]]
    assert vertical == {-1.0, 1.0} and horizontal == pytest.approx([-np.log10(0.05)])
    plt.close("all")


def test_contrast_plots_are_written_with_and_without_calls(tmp_path):
    table = de_table()
    plot_contrast(table, tmp_path / "ma.png", tmp_path / "volcano.png", title="sim", lfc_threshold=0.5)
    none_called = table.assign(lfsr=0.5)
    plot_contrast(none_called, tmp_path / "ma0.png", tmp_path / "volcano0.png", title="sim")
    for name in ("ma", "volcano", "ma0", "volcano0"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def ppc_genes(n_genes: int, seed: int = 0) -> pd.DataFrame:
    """The per-gene table of scnbvi.ppc.check, with the columns the plots read."""
    rng = np.random.default_rng(seed)
    mean = rng.lognormal(0, 1.5, n_genes)
    variance = mean + mean**2 / 5 * rng.lognormal(0, 0.3, n_genes)
    zeros = np.exp(-mean)
    return pd.DataFrame({
        "mean_observed": mean, "mean_predicted": mean * rng.lognormal(0, 0.05, n_genes),
        "variance_observed": variance, "variance_predicted": mean + mean**2 / 5,
        "variance_low": (mean + mean**2 / 5) * 0.8, "variance_high": (mean + mean**2 / 5) * 1.25,
        "variance_outside": rng.uniform(size=n_genes) < 0.1,
        "zero_fraction_observed": zeros, "zero_fraction_predicted": zeros, "zero_fraction_low": zeros * 0.9,
        "zero_fraction_high": np.minimum(zeros * 1.1, 1), "zero_fraction_outside": rng.uniform(size=n_genes) < 0.1,
    })


@pytest.mark.parametrize("n_genes", [300, 5000])
def test_ppc_plots_are_written_as_points_or_as_a_density(tmp_path, n_genes, monkeypatch):
    genes = ppc_genes(n_genes)
    drawn = {}
    original_hexbin = plt.Axes.hexbin
    monkeypatch.setattr(plt.Axes, "hexbin", lambda self, *args, **kwargs: drawn.setdefault(
        "hexbin", original_hexbin(self, *args, **kwargs)))
    plot_ppc_mean_variance(genes, tmp_path / "mean_variance.png", alpha=5.0, title="sim: 200 cells, 50 draws")
    plot_ppc_zero_fraction(genes, tmp_path / "zero_fraction.png", title="sim: 200 cells, 50 draws")
    edges = np.linspace(0, 4, 11)
    histogram = pd.DataFrame({"log10_low": edges[:-1], "log10_high": edges[1:], "observed": np.arange(10),
                              "predicted": np.arange(10) + 0.5, "low": np.arange(10) - 1, "high": np.arange(10) + 2})
    plot_ppc_library_size(histogram, tmp_path / "library_size.png", title="sim: 200 cells, 50 draws")
    for name in ("mean_variance", "zero_fraction", "library_size"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert ("hexbin" in drawn) == (n_genes > 2000)


def test_ppc_titles_say_what_is_compared(monkeypatch, tmp_path):
    titles = []
    monkeypatch.setattr(plt.Axes, "set_title", lambda self, text, **kwargs: titles.append(text))
    plot_ppc_zero_fraction(ppc_genes(50), tmp_path / "zero_fraction.png", title="sim: 200 cells, 50 draws")
    assert titles == ["observed zero fraction vs its 90 % band over the replicated data sets (one per draw)\n"
                      "sim: 200 cells, 50 draws"]


class TableReader(HTMLParser):
    """The header and the rows of a page's table, and whether every tag that opened closed."""

    VOID = {"meta", "input", "br"}

    def __init__(self):
        super().__init__()
        self.open, self.header, self.rows, self.cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append(tag)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        assert self.open.pop() == tag, f"</{tag}> closes another tag"
        if tag in ("td", "th"):
            self.rows[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_html_table_holds_every_row_escaped_and_parses(tmp_path):
    table = de_table(20).assign(symbol=["<b>&x"] + [f"SYM{i}" for i in range(19)])
    table.iloc[1, table.columns.get_loc("symbol")] = np.nan
    path = tmp_path / "table.html"
    write_html_table(table, "sim: treated vs control", path, index_label="gene", note="20 of 20 genes")
    page = path.read_text()
    reader = TableReader()
    reader.feed(page)
    reader.close()
    assert reader.open == []
    header, *rows = reader.rows
    assert header == ["gene", "base_mean", "log2_fold_change", "lfsr", "symbol"]
    assert [row[0] for row in rows] == table.index.to_list()
    assert rows[0][4] == "<b>&x" and rows[1][4] == ""
    assert rows[2][3] == f"{table['lfsr'].iloc[2]:.6g}"
    assert "<script" in page and "src=" not in page and "http" not in page


def test_html_table_without_index_shows_the_columns_only():
    page = html_table(pd.DataFrame([{"quantity": "n_cells", "before load": 10, "load action": ""}]), "qc")
    assert "<td>n_cells</td><td>10</td><td></td>" in page
