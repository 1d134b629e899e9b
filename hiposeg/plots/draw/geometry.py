"""Picture 5: prototype geometry. One row per set of prototypes (baseline class means, run class
means, the run's learned prototypes): fine x fine cosine similarity with the classes ordered by the
hierarchy and each parent's block outlined (a hierarchical space shows warm blocks on the diagonal),
and fine x coarse similarity with each class's parent outlined and its most similar coarse
prototype dotted (a dot inside every outline: the nearest coarse prototype is the parent)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from hiposeg.plots.draw import DIVERGING_MAP, class_ticks, figure, outline_blocks
from hiposeg.plots.geometry import Geometry


def draw_geometry(sets: dict[str, Geometry], order: list[int], blocks: list[tuple[str, int, int]],
                  fine_names: list[str], coarse_names: list[str], fine_to_coarse: np.ndarray) -> Figure:
    """`sets`: title -> Geometry; `order`/`blocks`: the fine classes grouped by parent (`scores.hierarchy_order`)."""
    k, c = len(order), len(coarse_names)
    side = min(6.5, 2.2 + 0.16 * k)
    fig = figure(side * (1 + max(c / k, 0.25)) + 1.2, side * len(sets) + 0.4)
    axes = np.atleast_2d(fig.subplots(len(sets), 2, width_ratios=(k, max(c, k // 4))))
    names = [fine_names[i] for i in order]
    pi = np.asarray(fine_to_coarse)[order]
    image = None
    for (title, g), (ax_ff, ax_fc) in zip(sets.items(), axes):
        image = ax_ff.imshow(g.fine_cos[np.ix_(order, order)], cmap=DIVERGING_MAP, vmin=-1, vmax=1,
                             interpolation="nearest")
        outline_blocks(ax_ff, blocks)
        class_ticks(ax_ff, names, blocks)
        ax_ff.set_title(f"{title}: fine × fine\n{summary(g)}", fontsize=8)
        ax_fc.imshow(g.fine_coarse_cos[order], cmap=DIVERGING_MAP, vmin=-1, vmax=1, interpolation="nearest",
                     aspect="auto")
        for row, parent in enumerate(pi):
            ax_fc.add_patch(Rectangle((parent - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=0.8))
        nearest = g.nearest_coarse[order]
        rows = np.nonzero(nearest >= 0)[0]
        ax_fc.scatter(nearest[rows], rows, s=max(2.0, 14 - 0.08 * k), color="black", zorder=3)
        class_ticks(ax_fc, names, blocks, axis="y")
        ax_fc.set_xticks(range(c), coarse_names, rotation=90, fontsize=7)
        ax_fc.set_title("fine × coarse\n(box: parent, dot: nearest)", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="cosine similarity")
    return fig


def summary(g: Geometry) -> str:
    """One line of the geometry numbers for a panel title."""
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    return (f"nearest coarse = parent: {g.parent_hits}/{g.parent_counted}; "
            f"within {fmt(g.within)}, between {fmt(g.between)}")
