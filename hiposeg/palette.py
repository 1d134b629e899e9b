"""Hierarchy-aware class colours: the children of one parent share a hue family.

`family_palette(h, level)` gives every parent (the class one level up) a sector of the hue circle,
its sectors ordered by the grandparents so related parents sit side by side, and picks the colours
of its children inside that sector, greedily, each one as far (CIE76 ΔE in CIELAB) from every colour
already picked as possible, under normal vision and under simulated protanopia, deuteranopia and
tritanopia (Machado et al. 2009, full severity) alike. Siblings then differ mostly in lightness and
chroma, which colour-blind readers see too, and a picture of 150 classes stays readable. The top
level's classes (and a level's parents, for a legend) take the middle colour of their own sector.

Colours are computed with NumPy only (CIELAB, D65; no plotting library), so `hiposeg predict
--palette families` can use them. Deterministic: a pure function of the tree.
"""

from __future__ import annotations

import math

import numpy as np

from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy

PALETTES = ("hierarchy", "families")  # the hierarchy file's own colours (default), or hue families
# Machado, Oliveira & Fernandes (2009), severity 1.0, on linear RGB.
CVD_MATRICES = {
    "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "tritanopia": np.array([[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                            [0.004733, 0.691367, 0.303900]]),
}
FIRST_HUE = 40.0  # degrees (CIELAB): the first family is orange, away from the red-green confusion axis
MAX_SECTOR = 50.0  # at most this many degrees of hue per family, however few families there are
LIGHTNESS = np.arange(20.0, 96.0, 2.5)
CHROMA = (15.0, 30.0, 45.0, 60.0, 75.0, 90.0, 105.0)
HUE_STEPS = np.linspace(-0.5, 0.5, 5)
SECTOR_FILL = 0.9  # a family keeps this share of its sector: a gap of hue between neighbouring families
BASE_LIGHTNESS, BASE_CHROMA = 60.0, 45.0
# CIELAB <-> sRGB (D65, IEC 61966-2-1), computed here so that out-of-gamut colours can be told apart
XYZ_TO_RGB = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                       [0.0556434, -0.2040259, 1.0572252]])
WHITE = np.array([0.95047, 1.0, 1.08883])
DELTA = 6 / 29


def level_palette(h: Hierarchy, level: str, palette: str = "hierarchy") -> np.ndarray:
    """(K, 3) uint8 RGB colours of `level`: the hierarchy file's (`hierarchy`) or hue families
    (`families`: the fine level by `family_palette`, the coarse level by `parent_palette` of the fine
    level, so a coarse class has its children's hue; any other level by `family_palette`)."""
    if palette not in PALETTES:
        raise UserError(f"--palette {palette!r} is not one of {', '.join(PALETTES)}")
    if palette == "hierarchy":
        return h.colors(level)
    below = h.level_names[h.level_index(level) - 1] if h.level_index(level) > 0 else None
    if level == h.coarse_level and below == h.fine_level:
        return parent_palette(h, h.fine_level)
    return family_palette(h, level)


def family_palette(h: Hierarchy, level: str) -> np.ndarray:
    """(K, 3) uint8 RGB: the classes of `level` coloured by hue family (module docstring)."""
    families, candidates = _families(h, level)
    return _as_array(pick_far_apart(families, candidates), h.num_classes(level))


def parent_palette(h: Hierarchy, level: str) -> np.ndarray:
    """(K_up, 3) uint8 RGB of the parents of `level`: one colour in each family's hue sector, picked
    far apart like the children's (for the coarse level, and legends of `level`)."""
    li = h.level_index(level)
    if li + 1 == h.depth:
        raise ValueError(f"level {level!r} is the top level: it has no parents")
    up = h.level_names[li + 1]
    order = parents_in_hue_order(h, up)
    _, candidates = _families(h, level)
    return _as_array(pick_far_apart([[p] for p in order], candidates), h.num_classes(up))


def _families(h: Hierarchy, level: str) -> tuple[list[list[int]], list[np.ndarray]]:
    """The families of `level` (class ids per parent, in hue order) and each one's candidate colours.
    At the top level every class is a family of its own."""
    li = h.level_index(level)
    if li + 1 == h.depth:
        families = [[c.id] for c in h.classes(level)]
    else:
        members = h.children(h.level_names[li + 1])
        families = [members[p] for p in parents_in_hue_order(h, h.level_names[li + 1])]
    centres, width = sector_layout(len(families))
    return families, [sector_candidates(c, width) for c in centres]


def _as_array(colours: dict[int, np.ndarray], k: int) -> np.ndarray:
    out = np.zeros((k, 3), np.uint8)
    for cid, rgb in colours.items():
        out[cid] = rgb
    return out


def parents_in_hue_order(h: Hierarchy, level: str) -> list[int]:
    """Ids of `level`, grouped by their own parent (if any), so related families get adjacent hues."""
    classes = h.classes(level)
    return [c.id for c in sorted(classes, key=lambda c: (-1 if c.parent is None else c.parent, c.id))]


def sector_layout(n: int) -> tuple[np.ndarray, float]:
    """Centre hues (degrees) of `n` equal sectors starting at FIRST_HUE, and the width each may use."""
    return (FIRST_HUE + 360.0 * np.arange(n) / max(n, 1)) % 360.0, min(360.0 / max(n, 1), MAX_SECTOR) * SECTOR_FILL


def lch_to_rgb(lch: np.ndarray) -> np.ndarray:
    """(N, 3) CIELAB LCh -> (M, 3) uint8 sRGB of the rows inside the sRGB gamut (the others dropped)."""
    hue = np.radians(lch[:, 2])
    lab = np.stack([lch[:, 0], lch[:, 1] * np.cos(hue), lch[:, 1] * np.sin(hue)], axis=-1)
    fy = (lab[:, 0] + 16) / 116
    f = np.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], axis=-1)
    xyz = np.where(f > DELTA, f ** 3, 3 * DELTA**2 * (f - 4 / 29)) * WHITE
    linear = xyz @ XYZ_TO_RGB.T
    inside = np.all((linear >= -1e-6) & (linear <= 1 + 1e-6), axis=1)
    return np.rint(linear_to_srgb(np.clip(linear[inside], 0, 1)) * 255).astype(np.uint8)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 sRGB -> (N, 3) float CIELAB (D65)."""
    xyz = srgb_to_linear(np.asarray(rgb, np.float64).reshape(-1, 3) / 255.0) @ np.linalg.inv(XYZ_TO_RGB).T / WHITE
    f = np.where(xyz > DELTA**3, np.cbrt(xyz), xyz / (3 * DELTA**2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=-1)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * np.maximum(x, 0) ** (1 / 2.4) - 0.055)


def simulate_cvd(rgb: np.ndarray, kind: str) -> np.ndarray:
    """(N, 3) uint8 sRGB as seen with a colour-vision deficiency (`CVD_MATRICES`)."""
    linear = srgb_to_linear(np.asarray(rgb, np.float64) / 255.0)
    return np.rint(linear_to_srgb(np.clip(linear @ CVD_MATRICES[kind].T, 0, 1)) * 255).astype(np.uint8)


def sector_candidates(centre: float, width: float) -> np.ndarray:
    """(N, 3) uint8: the in-gamut grid of lightness x chroma x hue inside one sector."""
    grid = np.array([(lum, c, centre + dh * width) for lum in LIGHTNESS for c in CHROMA for dh in HUE_STEPS])
    return np.unique(lch_to_rgb(grid), axis=0)


def views(rgb: np.ndarray) -> np.ndarray:
    """(V, N, 3) CIELAB of the colours under normal vision and each simulated deficiency."""
    return np.stack([rgb_to_lab(rgb)] + [rgb_to_lab(simulate_cvd(rgb, k)) for k in CVD_MATRICES])


def min_distance(rgb: np.ndarray) -> float:
    """The smallest ΔE between two of the colours, over normal vision and every simulated deficiency."""
    lab = views(rgb)
    d = np.linalg.norm(lab[:, :, None] - lab[:, None, :], axis=-1).min(axis=0)
    np.fill_diagonal(d, np.inf)
    return float(d.min()) if len(rgb) > 1 else math.inf


def pick_far_apart(families: list[list[int]], candidates: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Class id -> colour: families take turns; each picks, from its own candidates, the colour whose
    smallest distance (over every view) to the colours picked so far is largest. The very first
    pick is the first family's candidate nearest a mid-lightness grey-free middle (L=60, C=45)."""
    cand_views = [views(c) for c in candidates]
    nearest = [np.full(len(c), np.inf) for c in candidates]  # each candidate's distance to the picks so far
    out: dict[int, np.ndarray] = {}
    queues = [list(m) for m in families]
    while any(queues):
        for f, queue in enumerate(queues):
            if not queue:
                continue
            if not out:
                lab = cand_views[f][0]
                best = int(np.argmin(np.abs(lab[:, 0] - BASE_LIGHTNESS) + np.abs(np.hypot(lab[:, 1], lab[:, 2]) - BASE_CHROMA)))
            else:
                best = int(np.argmax(nearest[f]))
            out[queue.pop(0)] = candidates[f][best]
            picked = cand_views[f][:, best]  # (V, 3)
            for g, cv in enumerate(cand_views):
                nearest[g] = np.minimum(nearest[g], np.linalg.norm(cv - picked[:, None], axis=-1).min(axis=0))
    return out
