"""Rich tables for report.json: per-level mIoU, then per-class IoU with class names.

Class and level names come from the user's hierarchy file, so every cell and title is a `Text`
(never parsed as Rich markup: a class called `[/red]` is printed as written)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def summary_table(report: dict[str, Any]) -> Table:
    t = Table(title=Text("mIoU per hierarchy level"), title_justify="left")
    t.add_column("level")
    t.add_column("name")
    t.add_column("classes", justify="right")
    t.add_column("mIoU %", justify="right", style="bold")
    t.add_column("pixel acc. %", justify="right")
    for key, lv in report["levels"].items():
        t.add_row(*(Text(str(c)) for c in (key, lv["level"], lv["num_classes"], _fmt(lv["mIoU"]),
                                           _fmt(lv["pixel_accuracy"]))))
    return t


def class_table(key: str, level: dict[str, Any], columns: int = 3) -> Table:
    """Per-class IoU laid out in `columns` column pairs so 150 classes stay readable."""
    t = Table(title=Text(f"IoU per class — {key} ({level['level']})"), title_justify="left")
    for _ in range(columns):
        t.add_column("class")
        t.add_column("IoU %", justify="right")
    items = list(level["IoU"].items())
    rows = (len(items) + columns - 1) // columns
    for r in range(rows):
        cells: list[Text] = []
        for c in range(columns):
            i = c * rows + r
            cells += [Text(items[i][0]), Text(_fmt(items[i][1]))] if i < len(items) else [Text(""), Text("")]
        t.add_row(*cells)
    return t


def invalid_note(report: dict[str, Any]) -> Text | None:
    """A warning line when the evaluation left invalid ground-truth values out (`--invalid-gt ignore`)."""
    bad = report.get("invalid_ground_truth")
    if not bad:
        return None
    return Text(f"warning: {bad['pixels']:,} ground-truth pixels in {len(bad['files'])} file(s) hold values that are "
                f"neither a class nor ignore (values {', '.join(bad['values'])}); they are left out of every score "
                "and listed in the report under \"invalid_ground_truth\"", style="yellow")


def print_report(report: dict[str, Any], console: Console, per_class: bool = True) -> None:
    if per_class:
        for key, lv in report["levels"].items():
            console.print(class_table(key, lv, columns=1 if lv["num_classes"] <= 12 else 3))
    console.print(summary_table(report))
    note = invalid_note(report)
    if note is not None:
        console.print(note)
