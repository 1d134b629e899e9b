"""Picture 6: confusion matrices of one level, rows (ground truth) normalised, classes ordered by the
hierarchy with each parent's block outlined (confusion inside a block is between siblings; outside,
across parents), one panel per model. A power-law colour scale keeps small confusions visible."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from hiposeg.plots.draw import SEQUENTIAL_MAP, class_ticks, figure, outline_blocks

COLOURBAR_TICKS = (0.0, 0.05, 0.2, 0.5, 1.0)


def draw_confusion(matrices: dict[str, np.ndarray], order: list[int], blocks: list[tuple[str, int, int]],
                   names: list[str], title: str) -> Figure:
    """`matrices`: model label -> (K, K) row-normalised matrix in id order (the "other" column dropped)."""
    k = len(order)
    side = min(7.0, 2.4 + 0.17 * k)
    fig = figure(side * len(matrices) + 1.0, side + 0.6)
    axes = np.atleast_1d(fig.subplots(1, len(matrices)))
    shown = [names[i] for i in order]
    image = None
    for ax, (label, mat) in zip(axes, matrices.items()):
        image = ax.imshow(mat[np.ix_(order, order)], cmap=SEQUENTIAL_MAP, norm=PowerNorm(0.5, vmin=0, vmax=1),
                          interpolation="nearest")
        outline_blocks(ax, blocks, colour="white")
        class_ticks(ax, shown, blocks)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("ground truth", fontsize=8)
        ax.set_title(label, fontsize=9)
    bar = fig.colorbar(image, ax=axes, shrink=0.7, label="share of the ground-truth class's pixels")
    bar.set_ticks(COLOURBAR_TICKS)  # evenly spread on the square-root scale (the default crowds near 1)
    fig.suptitle(title, fontsize=10)
    return fig
