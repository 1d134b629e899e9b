"""Picture 2: per-class IoU of one level (the form of the paper's Tables 7/8 and 13-15).

With a baseline: left, each class's IoU in the baseline (open circle) and the run (filled), joined;
right, the gain in points, blue for a gain and vermillion for a loss. Without one: the run's IoU.
Classes are grouped under their parent (a band in the parent's colour, its name on the right), groups
and classes sorted by gain (`scores.grouped_by_gain`).
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hiposeg.plots.draw import GAIN, LOSS, colours01, figure, label_size
from hiposeg.plots.scores import ClassRow

ROW_INCHES = 0.2


def draw_class_iou(groups: list[tuple[str | None, list[ClassRow]]], title: str, run_label: str,
                   baseline_label: str | None, group_colours: dict[str, np.ndarray]) -> Figure:
    """The picture of the module docstring; `group_colours`: parent name -> uint8 RGB."""
    rows = [r for _, members in groups for r in members]
    n = len(rows)
    fig = figure(9.0 if baseline_label else 6.5, max(2.5, ROW_INCHES * n * (0.8 if n > 60 else 1.0) + 1.2))
    if baseline_label:
        ax_iou, ax_gain = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    else:
        ax_iou, ax_gain = fig.subplots(1, 1), None
    y = np.arange(n)
    bands(ax_iou, groups, group_colours, names=ax_gain is None)
    if ax_gain is not None:
        dumbbells(ax_iou, rows, run_label, baseline_label)
        gain_bars(ax_gain, rows)
        ax_iou.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, fontsize=8, frameon=False,
                      borderaxespad=0.2)
        bands(ax_gain, groups, group_colours, names=True)
    else:
        values = [r.run if r.run is not None else 0.0 for r in rows]
        ax_iou.barh(y[[r.run is not None for r in rows]], [v for v, r in zip(values, rows) if r.run is not None],
                    color=GAIN, height=0.7)
        ax_iou.set_xlabel(f"IoU (%) — {run_label}", fontsize=8)
    ax_iou.set_yticks(y, [r.name for r in rows], fontsize=label_size(n))
    ax_iou.set_ylim(n - 0.5, -0.5)
    ax_iou.set_xlim(0, 100)
    fig.suptitle(title, fontsize=10)
    return fig


def dumbbells(ax: Axes, rows: list[ClassRow], run_label: str, baseline_label: str) -> None:
    """Baseline (open) and run (filled) IoU per class, joined by a line coloured by the gain's sign."""
    for i, r in enumerate(rows):
        if r.run is not None and r.baseline is not None:
            ax.plot([r.baseline, r.run], [i, i], color=GAIN if r.run >= r.baseline else LOSS, linewidth=1.5, zorder=2)
    ys = np.arange(len(rows))
    base = np.array([np.nan if r.baseline is None else r.baseline for r in rows])
    run = np.array([np.nan if r.run is None else r.run for r in rows])
    ax.scatter(base, ys, s=18, facecolors="white", edgecolors="black", linewidths=0.8, zorder=3, label=baseline_label)
    ax.scatter(run, ys, s=18, color="black", zorder=3, label=run_label)
    ax.set_xlabel("IoU (%)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def gain_bars(ax: Axes, rows: list[ClassRow]) -> None:
    """One bar per class with both IoUs: run - baseline in points, its value written beside it."""
    idx = [i for i, r in enumerate(rows) if r.gain is not None]
    gains = [rows[i].gain for i in idx]
    ax.barh(idx, gains, color=[GAIN if g >= 0 else LOSS for g in gains], height=0.7)
    ax.axvline(0, color="black", linewidth=0.8)
    span = max([abs(g) for g in gains] + [1.0])
    for i, g in zip(idx, gains):
        ax.text(g + (0.02 if g >= 0 else -0.02) * span, i, f"{g:+.1f}", va="center", ha="left" if g >= 0 else "right",
                fontsize=max(4.0, label_size(len(rows)) - 1))
    ax.set_xlim(-1.25 * span if min(gains + [0]) < 0 else -0.05 * span, 1.25 * span)
    ax.set_xlabel("gain (points of IoU)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def bands(ax: Axes, groups: list[tuple[str | None, list[ClassRow]]], colours: dict[str, np.ndarray],
          names: bool) -> None:
    """A light band in each parent's colour behind its classes, and its name right of the axes."""
    start = 0
    for name, members in groups:
        end = start + len(members)
        if name is not None:
            colour = colours01(colours.get(name, np.array([200, 200, 200])))
            ax.axhspan(start - 0.5, end - 0.5, color=colour, alpha=0.18, linewidth=0, zorder=0)
            ax.axhline(end - 0.5, color="0.6", linewidth=0.5, zorder=1)
            if names:
                ax.text(1.01, (start + end - 1) / 2, name, transform=ax.get_yaxis_transform(), va="center", ha="left",
                        fontsize=max(label_size(len(groups)), 6), fontweight="bold")
        start = end
