"""The self-contained HTML page: every picture embedded (base64 PNG), what it shows, the numbers
behind it, and the pictures that could not be drawn with the reason. One file, no network access."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; margin: .8em 0; font-size: 12px; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; } td:first-child, th:first-child { text-align: left; }
details { margin: .5em 0; } .note { color: #555; } nav a { margin-right: 1em; }
"""


def table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def embedded_png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def render_page(title: str, runs: list[list[str]], notes: list[str], pictures: list[Any],
                skipped: dict[str, str]) -> str:
    """The page: a table of the runs, notes, one section per picture (`pictures.Picture`), the skipped ones."""
    nav = " ".join(f'<a href="#{html.escape(p.name)}">{html.escape(p.title)}</a>' for p in pictures)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             table_html(["run", "path", "loss terms", "schedule", "iterations", "checkpoint", "scores from"], runs),
             "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes), f"<nav>{nav}</nav>"]
    for i, p in enumerate(pictures, 1):
        png = next(f for f in p.files if f.suffix == ".png")
        others = ", ".join(f.name for f in p.files)
        parts.append(f"<section id='{html.escape(p.name)}'><h2>{i}. {html.escape(p.title)}</h2>"
                     f"<p>{html.escape(p.caption)}</p>{embedded_png(png)}<p class='note'>files: {html.escape(others)}</p>")
        if p.table is not None:
            header, rows = p.table
            inner = table_html(header, rows)
            parts.append(inner if len(rows) <= 25 else
                         f"<details><summary>the numbers ({len(rows)} rows)</summary>{inner}</details>")
        parts.append("</section>")
    if skipped:
        parts.append("<h2>Not drawn</h2>" + table_html(["picture", "why"], [[k, v] for k, v in skipped.items()]))
    parts.append("<p class='note'>Written by <code>hiposeg plot</code>; every number is also in numbers.json.</p>"
                 "</body></html>")
    return "\n".join(parts)
