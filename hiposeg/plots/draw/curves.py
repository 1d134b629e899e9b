"""Picture 1: training curves of one or more runs, one panel per quantity, phases shaded."""

from __future__ import annotations

import math
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hiposeg.plots.curves import Series
from hiposeg.plots.draw import RUN_COLOURS, figure

PANELS = {"loss": "total loss (eq. 14)", "ce": "cross-entropy", "fh": "L_fh (eq. 7)", "hh": "L_hh (eq. 8)",
          "fl": "L_fl (eq. 9)", "ll": "L_ll (eq. 10)", "align": "L_align (eq. 13)", "lr": "learning rate"}
LEVEL_STYLES = ("-", "--", ":", "-.")


@dataclass
class RunCurves:
    label: str
    train: dict[str, Series]
    evals: dict[str, Series]


def draw_curves(runs: list[RunCurves], spans: list[tuple[int, int, str]], columns: int = 3) -> Figure:
    """Panels of PANELS that any run logged, then "validation mIoU"; runs in RUN_COLOURS order (the
    legend on top); `spans` (first, end, label) shaded in every panel, labelled in the top row."""
    keys = [k for k in PANELS if any(k in r.train for r in runs)]
    has_eval = any(r.evals for r in runs)
    n = len(keys) + has_eval
    rows = max(1, math.ceil(n / columns))
    fig = figure(4.0 * columns, 2.6 * rows + 0.5)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for i, key in enumerate(keys):
        ax = axes[i]
        for colour, run in zip(RUN_COLOURS, runs):
            if key in run.train:
                s = run.train[key]
                ax.plot(s.iters, s.values, color=colour, linewidth=1.2, marker="." if len(s.iters) < 15 else None)
        ax.set_title(PANELS[key], fontsize=9)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if has_eval:
        miou_panel(axes[len(keys)], runs)
    for i, ax in enumerate(axes[:n]):
        shade_phases(ax, spans, label=i < columns)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=c, linewidth=2, label=r.label) for c, r in zip(RUN_COLOURS, runs)]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 4), fontsize=8, frameon=False)
    return fig


def miou_panel(ax: Axes, runs: list[RunCurves]) -> None:
    """Validation mIoU per level: colour = run, line style = level (legend for the styles)."""
    levels: list[str] = []
    for colour, run in zip(RUN_COLOURS, runs):
        for level, s in run.evals.items():
            if level not in levels:
                levels.append(level)
            style = LEVEL_STYLES[levels.index(level) % len(LEVEL_STYLES)]
            ax.plot(s.iters, s.values, color=colour, linestyle=style, marker="o", markersize=3, linewidth=1.2)
    ax.set_title("validation mIoU (%)", fontsize=9)
    ax.legend(handles=[Line2D([], [], color="grey", linestyle=LEVEL_STYLES[i % len(LEVEL_STYLES)], label=lv)
                       for i, lv in enumerate(levels)], fontsize=7, loc="best")  # not over the last points


def shade_phases(ax: Axes, spans: list[tuple[int, int, str]], label: bool) -> None:
    """Alternate grey bands over the phases; their names along the top edge when `label`."""
    for i, (first, end, name) in enumerate(spans):
        ax.axvspan(first, end, color="0.85" if i % 2 else "0.93", zorder=0, linewidth=0)
        if label:
            ax.text((first + end) / 2, 0.98, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=7, color="0.3")
