"""The pictures, one module per kind, each a function from numbers to a matplotlib `Figure` (built
without pyplot: no global state, no display), and what they share: sizes, colours, the atomic save.

    curves.py      1  training curves: loss terms, total, lr, periodic mIoU; phases shaded
    iou.py         2  per-class IoU (baseline vs run) and its gain, classes grouped under parents
    levels.py      3  mIoU at every level and the gaps between levels
    featuremap.py  4  2-D map of sampled pixel features, baseline beside run
    geometry.py    5  prototype cosine similarities ordered by the hierarchy
    confusion.py   6  row-normalised confusion matrices with the hierarchy's blocks outlined
    gallery.py     7  image | ground truth | baseline | run, fine and coarse, errors marked
    ablation.py    8  an ablation's rows, mean ± std over seeds, the paper's values beside
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from hiposeg.atomic import atomic_write_bytes

DPI = 110
# Okabe-Ito: distinguishable with every common colour-vision deficiency.
GAIN = "#0072B2"  # blue
LOSS = "#D55E00"  # vermillion
RUN_COLOURS = ("#000000", "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442")
LEVEL_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7")
SEQUENTIAL_MAP = "viridis"
DIVERGING_MAP = "RdBu_r"


def figure(width: float, height: float) -> Figure:
    """A new figure (inches) with constrained layout, so labels and legends do not overlap."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(fig: Figure, folder: Path, stem: str, svg: bool = False) -> list[Path]:
    """FOLDER/STEM.png (and .svg), each written atomically. Returns the files written."""
    written = []
    for fmt in ("png", "svg") if svg else ("png",):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI, facecolor="white")
        path = Path(folder) / f"{stem}.{fmt}"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def colours01(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB rows -> floats in [0, 1] for matplotlib."""
    return np.asarray(rgb, np.float64) / 255.0


def label_size(count: int) -> float:
    """Font size (points) of per-class tick labels: smaller as classes grow, never below 4."""
    return max(4.0, min(8.0, 8.0 - (count - 20) * 0.04))


def outline_blocks(ax: Axes, blocks: list[tuple[str, int, int]], columns: list[tuple[str, int, int]] | None = None,
                   colour: str = "black") -> None:
    """Rectangles around each hierarchy block of an image-like matrix (rows x rows, or rows x `columns`)."""
    cols = columns if columns is not None else blocks
    for (_, r0, r1), (_, c0, c1) in zip(blocks, cols):
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor=colour, linewidth=1.0))


def class_ticks(ax: Axes, names: list[str], blocks: list[tuple[str, int, int]], axis: str = "both",
                limit: int = 60) -> None:
    """Tick labels of a hierarchy-ordered matrix: every class name up to `limit` classes, else one
    label per block (its parent's name) at the block's middle."""
    if len(names) <= limit or not blocks:
        ticks, labels, size = list(range(len(names))), names, label_size(len(names))
    else:
        ticks = [(a + b - 1) / 2 for _, a, b in blocks]
        labels, size = [name for name, _, _ in blocks], label_size(len(blocks))
    if axis in ("both", "y"):
        ax.set_yticks(ticks, labels, fontsize=size)
    if axis in ("both", "x"):
        ax.set_xticks(ticks, labels, fontsize=size, rotation=90)
