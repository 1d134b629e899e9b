"""Picture 3: mIoU at every hierarchy level for each run (the paper's Fig. 3), with the gap between
the fine level and each level above it written over the run's bars."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from hiposeg.plots.draw import LEVEL_COLOURS, figure


def draw_levels(table: dict[str, dict[str, float | None]], levels: list[str], level_names: dict[str, str]) -> Figure:
    """`table`: run label -> {level key: mIoU, "gap <key> - fine": points} (`scores.level_table`);
    one group of bars per run, one bar per level key in `levels`."""
    runs = list(table)
    fig = figure(max(4.5, 1.2 + 1.1 * len(runs) * len(levels) * 0.6), 3.8)
    ax = fig.subplots()
    width = 0.8 / len(levels)
    x = np.arange(len(runs))
    for j, level in enumerate(levels):
        values = [table[r].get(level) for r in runs]
        pos = x - 0.4 + width * (j + 0.5)
        shown = [(p, v) for p, v in zip(pos, values) if v is not None]
        bars = ax.bar([p for p, _ in shown], [v for _, v in shown], width * 0.95, color=LEVEL_COLOURS[j % 4],
                      label=f"{level} ({level_names[level]})")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    for i, r in enumerate(runs):
        gaps = [f"{level}: {table[r][f'gap {level} - fine']:+.1f}" for level in levels[1:]
                if table[r].get(f"gap {level} - fine") is not None]
        if gaps:
            ax.text(x[i], 104, "gap to fine\n" + "\n".join(gaps), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, runs, fontsize=8)
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("mIoU (%)", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7, frameon=False)
    return fig
