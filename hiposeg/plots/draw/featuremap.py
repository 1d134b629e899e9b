"""Picture 4: the sampled pixel features in 2-D (the paper's Fig. 4), one panel per model (baseline
first), coloured by fine class with the hierarchy-aware palette; the legend lists the classes under
their parents, which share a hue family."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hiposeg.plots.draw import colours01, figure

LEGEND_ROWS = 42  # entries per legend column


def draw_feature_map(maps: dict[str, np.ndarray], labels: np.ndarray, titles: dict[str, str],
                     fine_names: list[str], fine_colours: np.ndarray, groups: list[tuple[str, list[int]]],
                     method: str) -> Figure:
    """`maps`: model label -> (N, 2) coordinates of the same N pixels, whose fine ids are `labels`;
    `groups`: (parent name, its fine ids) in legend order."""
    entries = sum(len(ids) + 1 for _, ids in groups)
    legend_columns = max(1, math.ceil(entries / LEGEND_ROWS))
    fig = figure(4.6 * len(maps) + 1.7 * legend_columns, 4.9)
    axes = np.atleast_1d(fig.subplots(1, len(maps)))
    point = 10 if len(labels) < 3000 else 4
    colours = colours01(fine_colours)
    for ax, (label, xy) in zip(axes, maps.items()):
        order = np.random.default_rng(0).permutation(len(labels))  # no class painted last over all others
        ax.scatter(xy[order, 0], xy[order, 1], s=point, c=colours[labels[order]], linewidths=0, alpha=0.85,
                   rasterized=True)
        ax.set_title(titles[label], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{method} 1", fontsize=7)
        ax.set_ylabel(f"{method} 2", fontsize=7)
    handles, bold = [], []
    for parent, ids in groups:
        bold.append(len(handles))
        handles.append(Line2D([], [], linestyle="none", label=parent))
        handles += [Line2D([], [], linestyle="none", marker="o", markersize=5, color=colours[i],
                           label=f"  {fine_names[i]}") for i in ids]
    legend = fig.legend(handles=handles, loc="outside right upper", ncols=legend_columns, frameon=False,
                        fontsize=7 if entries <= LEGEND_ROWS else 5.5, handletextpad=0.2, columnspacing=0.8)
    for i in bold:
        legend.get_texts()[i].set_fontweight("bold")
    return fig
