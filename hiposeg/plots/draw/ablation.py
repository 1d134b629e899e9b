"""Picture 8: an ablation as a chart: per configuration, fine and coarse mIoU (mean over seeds, the
error bar one sample standard deviation, "n" the finished seeds), and the paper's fine-level value
(Tables 5/6) as a diamond where the configuration matches a row of the paper."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from hiposeg.plots.draw import LEVEL_COLOURS, figure

PAPER_MARK = "#000000"


def draw_ablation(rows: list[dict[str, Any]], title: str) -> Figure:
    """`rows`: {"config", "fine"/"coarse": {"mean", "std", "n"}, "paper": fine mIoU or None}, top to bottom."""
    n = len(rows)
    fig = figure(8.0, 1.0 + 0.55 * n)
    ax = fig.subplots()
    y = np.arange(n)
    for j, level in enumerate(("fine", "coarse")):
        pos = y - 0.2 + 0.4 * j
        shown = [(p, r[level]) for p, r in zip(pos, rows) if r[level]["mean"] is not None]
        if not shown:
            continue
        means = [s["mean"] for _, s in shown]
        errs = [s["std"] or 0.0 for _, s in shown]
        bars = ax.barh([p for p, _ in shown], means, height=0.38, xerr=errs, color=LEVEL_COLOURS[j],
                       error_kw={"elinewidth": 1, "capsize": 2}, label=f"{level} mIoU")
        ax.bar_label(bars, labels=[f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["std"] is not None else "")
                                   + f" (n={s['n']})" for _, s in shown], fontsize=6, padding=3)
    paper = [(i, r["paper"]) for i, r in enumerate(rows) if r.get("paper") is not None]
    if paper:
        ax.scatter([v for _, v in paper], [y[i] - 0.2 for i, _ in paper], marker="D", s=28, color=PAPER_MARK,
                   zorder=3, label="paper, fine mIoU")
    ax.set_yticks(y, [r["config"] for r in rows], fontsize=7)
    ax.set_ylim(n - 0.5, -0.6)
    ax.set_xlim(0, 118)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("mIoU (%)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=7, frameon=False)  # below: the title is on top
    fig.suptitle(title, fontsize=9)
    return fig
