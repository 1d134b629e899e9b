"""Picture 7: qualitative results (the paper's Figs. 5-7). One row per image: the image, then for the
fine and for the coarse level the ground truth and each model's prediction; pixels where a
prediction differs from the ground truth are darkened and outlined in white."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from hiposeg.plots.draw import colours01, figure

IGNORE_RGB = np.array([0, 0, 0], np.uint8)
ERROR_DARKEN = 0.45


@dataclass
class GalleryRow:
    stem: str
    why: str
    image: np.ndarray  # (H, W, 3) uint8
    truth: dict[str, np.ndarray]  # level -> (H, W) ids, ignore = the hierarchy's ignore value
    predictions: dict[str, dict[str, np.ndarray]]  # model label -> level -> (H, W) ids
    note: str  # e.g. per-model accuracy


def coloured(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: each id's palette colour, ids outside the palette (ignore) black."""
    known = (labels >= 0) & (labels < len(palette))
    out = np.empty(labels.shape + (3,), np.uint8)
    out[:] = IGNORE_RGB
    out[known] = palette[labels[known]]
    return out


def error_mask(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Labelled pixels whose prediction is not the ground truth."""
    return (truth >= 0) & (truth < num_classes) & (pred != truth)


def draw_gallery(rows: list[GalleryRow], palettes: dict[str, np.ndarray], level_names: dict[str, str],
                 legend: dict[str, list[tuple[str, np.ndarray]]]) -> Figure:
    """`palettes`: level key ("fine", "coarse") -> (K, 3) uint8; `legend`: level key -> (name, colour)."""
    models = list(rows[0].predictions)
    levels = list(palettes)
    columns = ["image"] + [f"{what}\n{level_names[lv]}" for lv in levels for what in ("ground truth", *models)]
    cell = 1.7
    entries = sum(len(v) for v in legend.values())
    fig = figure(cell * len(columns), cell * len(rows) + 0.5 + 0.16 * (entries // 8 + len(legend)))
    axes = np.atleast_2d(fig.subplots(len(rows), len(columns)))
    for r, (row, ax_row) in enumerate(zip(rows, axes)):
        panels = [row.image]
        masks: list[np.ndarray | None] = [None]
        for lv in levels:
            truth = row.truth[lv]
            panels.append(coloured(truth, palettes[lv]))
            masks.append(None)
            for m in models:
                pred = row.predictions[m][lv]
                err = error_mask(pred, truth, len(palettes[lv]))
                shown = coloured(pred, palettes[lv]).astype(np.float32)
                shown[err] *= ERROR_DARKEN
                panels.append(shown.astype(np.uint8))
                masks.append(err)
        for c, (ax, panel, err) in enumerate(zip(ax_row, panels, masks)):
            ax.imshow(panel, interpolation="nearest")
            if err is not None and err.any():
                ax.contour(err.astype(np.float32), levels=[0.5], colors="white", linewidths=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=7)
        ax_row[0].set_ylabel(f"{row.stem}\n{row.why}\n{row.note}", fontsize=6, rotation=0, ha="right", va="center")
    handles = [Patch(color=colours01(col), label=name) for lv in levels for name, col in legend[lv]]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(8, len(handles)), fontsize=6, frameon=False,
               handlelength=1.0, columnspacing=0.8)
    return fig
