"""Tables as standalone HTML pages: the Snakemake report shows an .html result inline (in a frame),
while a .tsv is only a download. Each page sorts by a click on a column's header and filters rows
by a search box, with its script and style inline: clusters are often offline, so no CDN."""

from __future__ import annotations

from html import escape

import pandas as pd

from scnbvi.outputs import atomic_output

# Rows of a long table (genes.tsv, a DE table) its page shows; its .tsv holds every row.
SHOWN_ROWS = 500

STYLE = (
    "body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse}"
    "th,td{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}"
    "th{cursor:pointer;position:sticky;top:0;background:#f4f4f4} th:after{content:' \\2195';color:#aaa}"
    "input{margin:4px 0 8px;padding:3px;width:20em} .note{color:#555}"
)

# Sorts numbers as numbers (empty cells last) and text as text; hides the rows without the search text.
SCRIPT = """
const table = document.querySelector("table");
const body = table.tBodies[0];
const value = (row, column) => row.cells[column].textContent.trim();
table.querySelectorAll("th").forEach((header, column) => {
  header.addEventListener("click", () => {
    const ascending = header.dataset.order !== "ascending";
    table.querySelectorAll("th").forEach(other => delete other.dataset.order);
    header.dataset.order = ascending ? "ascending" : "descending";
    const rows = Array.from(body.rows);
    const numeric = rows.every(row => value(row, column) === "" || !isNaN(Number(value(row, column))));
    rows.sort((a, b) => {
      const x = value(a, column), y = value(b, column);
      if (x === "" || y === "") return (x === "") - (y === "");
      const order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      return ascending ? order : -order;
    });
    rows.forEach(row => body.appendChild(row));
  });
});
document.querySelector("input").addEventListener("input", event => {
  const text = event.target.value.toLowerCase();
  Array.from(body.rows).forEach(row => {
    row.hidden = text !== "" && !row.textContent.toLowerCase().includes(text);
  });
});
"""


def cell_text(value) -> str:
    """A cell as a person reads it: floats to 6 significant digits, missing values empty."""
    if value is None or (not isinstance(value, str) and pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def html_table(frame: pd.DataFrame, title: str, *, index_label: str | None = None, note: str = "") -> str:
    """``frame`` as a sortable, searchable HTML page; with ``index_label``, the index is the first
    column under that name."""
    if index_label is not None:
        frame = frame.rename_axis(index_label).reset_index()
    header = "".join(f"<th>{escape(str(column))}</th>" for column in frame.columns)
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{escape(cell_text(value))}</td>" for value in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    note_line = f'<p class="note">{escape(note)}</p>\n' if note else ""
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body><h3>{escape(title)}</h3>\n{note_line}"
        '<input type="search" placeholder="search rows">\n'
        f"<table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>\n"
        f"<script>{SCRIPT}</script>\n</body></html>\n"
    )


def write_html_table(frame: pd.DataFrame, title: str, path, *, index_label: str | None = None, note: str = ""):
    """:func:`html_table` written atomically to ``path``."""
    with atomic_output(path) as temporary:
        temporary.write_text(html_table(frame, title, index_label=index_label, note=note))
