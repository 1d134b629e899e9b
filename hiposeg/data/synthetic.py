"""The built-in synthetic dataset: procedural scenes in which a part's label depends on its object.

Why it exists: it makes the whole pipeline (prepare -> train -> eval -> export) run on a fresh
machine in minutes, and it is built to exhibit the situation HiPoSeg targets: fine classes that
look alike locally and are told apart only by the coarse object around them.

Design (`hierarchies/synthetic.json`: 15 parts -> 5 objects)
-------------------------------------------------------------
* **Objects** (coarse): house, car, bus, boat, plus a background class with two stuff parts
  (sky above a random, slightly tilted horizon; ground below).
* **Parts** (fine) are painted from a shared **texture bank** of four families, and every object
  uses several of them:

      family   look                                   parts
      body     any hue, smooth top-down shading       house_wall  car_body  bus_body  boat_hull
      glass    pale blue, diagonal highlight band     house_window car_window bus_window boat_window
      dark     near-black, fine grain                 house_door  car_wheel  bus_wheel
      stripe   any hue, oriented stripes              house_roof  boat_sail

  The colour of each family is drawn per instance from the *same* distribution whatever the
  object, so a window pixel of a car and of a house are identically distributed: the part label is
  decidable only from the object's shape and layout (wall under a triangular roof with a window
  grid and a door; low body with a cabin and two wheels; a long box with a row of windows; a
  trapezoid hull with portholes under a sail).
* **Scenes**: 2-5 objects per image, placed on the ground with perspective scale (lower = larger,
  x0.8-1.25 jitter), drawn far-to-near so nearer objects occlude farther ones and may leave the
  frame. Then global brightness/contrast jitter, Gaussian blur (sigma 0-0.9 px) and Gaussian noise
  (sigma 2-7). Labels are drawn with the same polygons, so they are exact.
* **Determinism**: image i of split s is rendered from `numpy.random.default_rng([seed, s, i])`
  alone, so the files are byte-identical for a seed whatever the worker count.

`generate()` writes a prepared dataset directly (README "Preparing data"; real PNG images, manifest source
"synthetic"), with the same rules for the output folder as `hiposeg prepare` (`output.py`): one
process at a time (a lock), a journal header first (the folder is then recognisably hiposeg's),
the manifest last (an interrupted run is not taken for a finished set; the rerun makes it again),
and never into a folder that is not hiposeg's. 500 train / 100 val images of 128x128 take a few
seconds on 2 cores.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hiposeg.data.codecs import encode_png
from hiposeg.data.convert import class_counts, histogram
from hiposeg.data.journal import JOURNAL_FORMAT, Journal
from hiposeg.data.layout import HIERARCHY_NAME, JOURNAL_NAME, MANIFEST_NAME
from hiposeg.data.manifest import manifest_dict
from hiposeg.data.output import (OutputFolder, check_may_write, check_split_dirs_inside, clear_prepared, inspect_output,
                                 output_errors, remove_scratch)
from hiposeg.data.pool import WorkerPool, default_workers, progress_bar
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.atomic import atomic_write_bytes, atomic_write_json
from hiposeg.lock import DirectoryLock

SPLIT_CODES = {"train": 0, "val": 1}

# ---- the texture bank ------------------------------------------------------------------------
# Each family gives (base RGB colour, per-pixel pattern) for one painted region. HSV ranges use
# OpenCV's scale: hue 0..180, saturation and value 0..1.


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    px = np.array([[[h, s * 255, v * 255]]], np.float32).astype(np.uint8)
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _body(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    base = hsv_to_rgb(rng.uniform(0, 180), rng.uniform(0.35, 0.85), rng.uniform(0.45, 0.9))
    y0, y1 = box[1], box[3]
    shade = 1.1 - 0.3 * (ys - y0) / max(y1 - y0, 1.0)  # lit from above
    return base[None, :] * shade[:, None]


def _glass(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    base = hsv_to_rgb(rng.uniform(95, 110), rng.uniform(0.15, 0.4), rng.uniform(0.7, 0.92))
    period = rng.uniform(5.0, 9.0)
    band = (np.sin((xs + ys) * (2 * np.pi / period) + rng.uniform(0, 2 * np.pi)) > 0.6).astype(np.float32)
    return base[None, :] + 35.0 * band[:, None]


def _dark(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    base = hsv_to_rgb(rng.uniform(0, 180), rng.uniform(0.0, 0.25), rng.uniform(0.08, 0.25))
    return base[None, :] + rng.normal(0, 6.0, (len(ys), 1)).astype(np.float32)


def _stripe(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    base = hsv_to_rgb(rng.uniform(0, 180), rng.uniform(0.4, 0.9), rng.uniform(0.4, 0.85))
    theta, period = rng.uniform(0, np.pi), rng.uniform(3.5, 6.0)
    phase = (xs * np.cos(theta) + ys * np.sin(theta)) * (2 * np.pi / period)
    return base[None, :] + 28.0 * np.sign(np.sin(phase))[:, None]


def _sky(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    top = hsv_to_rgb(rng.uniform(95, 115), rng.uniform(0.3, 0.65), rng.uniform(0.7, 1.0))
    t = (ys / max(box[3], 1.0))[:, None]
    return top[None, :] * (1 - 0.6 * t) + 235.0 * 0.6 * t


def _ground(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    base = hsv_to_rgb(rng.uniform(10, 60), rng.uniform(0.25, 0.6), rng.uniform(0.3, 0.65))
    return base[None, :] + rng.normal(0, 10.0, (len(ys), 1)).astype(np.float32)


FAMILIES: dict[str, Callable[..., np.ndarray]] = {
    "body": _body, "glass": _glass, "dark": _dark, "stripe": _stripe, "sky": _sky, "ground": _ground,
}

# ---- scenes --------------------------------------------------------------------------------


class Canvas:
    """Label map + region map painted with the same cv2 shapes; regions get textures at the end."""

    def __init__(self, size: int, ids: dict[str, int]) -> None:
        self.size, self.ids = size, ids
        self.fine = np.zeros((size, size), np.uint8)
        self.region = np.zeros((size, size), np.uint16)
        self.families: list[str] = ["none"]  # region id -> texture family
        self.boxes: list[tuple[float, float, float, float]] = [(0, 0, 0, 0)]

    def _new_region(self, family: str, box: tuple[float, float, float, float]) -> int:
        self.families.append(family)
        self.boxes.append(box)
        return len(self.families) - 1

    def polygon(self, part: str, family: str, pts: np.ndarray) -> None:
        pts = np.round(pts).astype(np.int32).reshape(-1, 1, 2)
        box = (float(pts[..., 0].min()), float(pts[..., 1].min()), float(pts[..., 0].max()), float(pts[..., 1].max()))
        rid = self._new_region(family, box)
        cv2.fillPoly(self.fine, [pts], self.ids[part])
        cv2.fillPoly(self.region, [pts], rid)

    def rect(self, part: str, family: str, x0: float, y0: float, x1: float, y1: float) -> None:
        self.polygon(part, family, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))

    def circle(self, part: str, family: str, cx: float, cy: float, r: float) -> None:
        rid = self._new_region(family, (cx - r, cy - r, cx + r, cy + r))
        c, rr = (round(cx), round(cy)), max(1, round(r))
        cv2.circle(self.fine, c, rr, self.ids[part], -1)
        cv2.circle(self.region, c, rr, rid, -1)

    def texture(self, rng: np.random.Generator) -> np.ndarray:
        """RGB float image: each region painted by its family with its own random parameters."""
        img = np.zeros((self.size, self.size, 3), np.float32)
        order = np.argsort(self.region, axis=None, kind="stable")
        counts = np.bincount(self.region.ravel(), minlength=len(self.families))
        starts = np.concatenate([[0], np.cumsum(counts)])
        flat = img.reshape(-1, 3)
        for rid in range(1, len(self.families)):
            idx = order[starts[rid]:starts[rid + 1]]
            ys, xs = (idx // self.size).astype(np.float32), (idx % self.size).astype(np.float32)
            colours = FAMILIES[self.families[rid]](rng, ys, xs, self.boxes[rid])  # rng drawn even if fully hidden
            if len(idx):
                flat[idx] = colours
        return img


def draw_house(c: Canvas, rng: np.random.Generator, cx: float, yb: float, w: float) -> None:
    hw = w * rng.uniform(0.55, 0.8)
    x0, x1, top = cx - w / 2, cx + w / 2, yb - hw
    c.rect("house_wall", "body", x0, top, x1, yb)
    eave = w * 0.08
    apex = (cx + rng.uniform(-0.1, 0.1) * w, top - w * rng.uniform(0.3, 0.5))
    c.polygon("house_roof", "stripe", np.array([[x0 - eave, top], apex, [x1 + eave, top]]))
    cols, rows = int(rng.integers(2, 4)), int(rng.integers(1, 3))
    ww, wh = w * 0.15, hw * 0.2
    for r in range(rows):
        for k in range(cols):
            wx = x0 + (k + 1) * w / (cols + 1)
            wy = top + hw * (0.12 + 0.27 * r)
            c.rect("house_window", "glass", wx - ww / 2, wy, wx + ww / 2, wy + wh)
    dx = cx + rng.choice([-0.28, 0.0, 0.28]) * w
    c.rect("house_door", "dark", dx - w * 0.09, yb - hw * 0.42, dx + w * 0.09, yb)


def draw_car(c: Canvas, rng: np.random.Generator, cx: float, yb: float, w: float) -> None:
    r = w * 0.11
    body_bottom = yb - r * 0.8
    hb = w * rng.uniform(0.2, 0.26)
    body_top = body_bottom - hb
    c.rect("car_body", "body", cx - w / 2, body_top, cx + w / 2, body_bottom)
    shift = rng.uniform(-0.08, 0.08) * w
    cab_h = w * rng.uniform(0.16, 0.22)
    cab = np.array([[cx - 0.3 * w + shift, body_top], [cx - 0.18 * w + shift, body_top - cab_h],
                    [cx + 0.18 * w + shift, body_top - cab_h], [cx + 0.3 * w + shift, body_top]])
    c.polygon("car_body", "body", cab)
    inset = 0.25 * cab_h
    for side in (-1, 1):  # two side windows split by a pillar
        xa, xb = cx + shift + side * 0.03 * w, cx + shift + side * (0.26 * w - inset)
        xc = cx + shift + side * (0.16 * w - inset * 0.5)
        win = np.array([[xa, body_top - inset * 0.5], [xb, body_top - inset * 0.5],
                        [xc, body_top - cab_h + inset], [xa, body_top - cab_h + inset]])
        c.polygon("car_window", "glass", win)
    for side in (-1, 1):
        c.circle("car_wheel", "dark", cx + side * 0.3 * w, yb - r, r)


def draw_bus(c: Canvas, rng: np.random.Generator, cx: float, yb: float, w: float) -> None:
    w = w * 1.4
    r = w * 0.075
    body_bottom = yb - r * 0.7
    hb = w * rng.uniform(0.33, 0.42)
    top = body_bottom - hb
    c.rect("bus_body", "body", cx - w / 2, top, cx + w / 2, body_bottom)
    n = int(rng.integers(4, 7))
    gap = w * 0.03
    ww = (w * 0.9 - gap * (n - 1)) / n
    for k in range(n):
        wx = cx - w * 0.45 + k * (ww + gap)
        c.rect("bus_window", "glass", wx, top + hb * 0.15, wx + ww, top + hb * 0.45)
    for side in (-1, 1):
        c.circle("bus_wheel", "dark", cx + side * 0.33 * w, yb - r, r)


def draw_boat(c: Canvas, rng: np.random.Generator, cx: float, yb: float, w: float) -> None:
    hh = w * rng.uniform(0.2, 0.26)
    hull = np.array([[cx - w / 2, yb - hh], [cx + w / 2, yb - hh], [cx + 0.35 * w, yb], [cx - 0.35 * w, yb]])
    c.polygon("boat_hull", "body", hull)
    n = int(rng.integers(2, 5))
    for k in range(n):
        c.circle("boat_window", "glass", cx - 0.3 * w + k * 0.6 * w / max(n - 1, 1), yb - hh * 0.55, w * 0.045)
    mast = cx + rng.uniform(-0.1, 0.1) * w
    height = w * rng.uniform(0.6, 0.9)
    sail = np.array([[mast, yb - hh], [mast, yb - hh - height], [mast + rng.choice([-1, 1]) * 0.38 * w, yb - hh]])
    c.polygon("boat_sail", "stripe", sail)


OBJECTS: dict[str, Callable[[Canvas, np.random.Generator, float, float, float], None]] = {
    "house": draw_house, "car": draw_car, "bus": draw_bus, "boat": draw_boat,
}


def render(rng: np.random.Generator, size: int, ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 image, fine-id uint8 label map), both size x size."""
    c = Canvas(size, ids)
    s = float(size)
    horizon = rng.uniform(0.3, 0.55) * s
    tilt = rng.uniform(-0.08, 0.08) * s
    c.polygon("sky", "sky", np.array([[0, 0], [s, 0], [s, horizon + tilt], [0, horizon - tilt]]))
    c.polygon("ground", "ground", np.array([[0, horizon - tilt], [s, horizon + tilt], [s, s], [0, s]]))
    n = int(rng.integers(2, 6))
    placed = []
    for _ in range(n):
        kind = str(rng.choice(list(OBJECTS)))
        depth = rng.uniform(0.1, 1.0)  # 0 = at the horizon, 1 = at the bottom edge
        yb = horizon + depth * (s * 1.05 - horizon)
        width = s * (0.2 + 0.36 * depth) * rng.uniform(0.8, 1.25)
        placed.append((yb, kind, rng.uniform(-0.1, 1.1) * s, width))
    for yb, kind, cx, width in sorted(placed, key=lambda p: p[0]):  # far to near: near objects occlude
        OBJECTS[kind](c, rng, cx, yb, width)
    img = c.texture(rng)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
    sigma = rng.uniform(0.0, 0.9)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.normal(0, rng.uniform(2, 7), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), c.fine


# ---- writing the dataset -----------------------------------------------------------------------


@dataclass(frozen=True)
class SynthJob:
    out: Path
    size: int
    seed: int
    ids: dict[str, int]
    fine_to_coarse: np.ndarray  # uint8 LUT (256)
    ignore_index: int


_SYNTH: SynthJob | None = None


def _init_synth(job: SynthJob) -> None:
    global _SYNTH
    _SYNTH = job
    if multiprocessing.parent_process() is not None:
        cv2.setNumThreads(0)  # one process per core


def stem_of(split: str, index: int) -> str:
    return f"synthetic_{split}_{index:05d}"


def make_item(job: SynthJob, split: str, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([job.seed, SPLIT_CODES[split], index])
    image, fine = render(rng, job.size, job.ids)
    coarse = cv2.LUT(fine, job.fine_to_coarse)
    stem = stem_of(split, index)
    atomic_write_bytes(job.out / split / "images" / f"{stem}.png", encode_png(cv2.cvtColor(image, cv2.COLOR_RGB2BGR)))
    atomic_write_bytes(job.out / split / "fine" / f"{stem}.png", encode_png(fine))
    atomic_write_bytes(job.out / split / "coarse" / f"{stem}.png", encode_png(coarse))
    hist = histogram(fine)
    identity = np.arange(256, dtype=np.uint8)
    fine_counts, ignore = class_counts(hist, identity, job.ignore_index)
    coarse_counts, _ = class_counts(hist, job.fine_to_coarse, job.ignore_index)
    return {"split": split, "fine": fine_counts, "coarse": coarse_counts, "ignore": ignore}


def _make_in_worker(task: tuple[str, int]) -> dict[str, Any]:
    assert _SYNTH is not None, "worker not initialised"
    return make_item(_SYNTH, *task)


@dataclass
class Generated:
    """What `generate` did."""

    out: Path
    manifest: dict[str, Any]
    reused: bool  # `out` already held this set: nothing was written
    kept: list[str]  # files --overwrite left in `out` because hiposeg did not write them


def generate(out: Path, *, train: int = 500, val: int = 100, size: int = 128, seed: int = 0,
             workers: int | None = None, overwrite: bool = False, quiet: bool = True) -> Generated:
    """Write the synthetic set as a prepared dataset at `out`.

    If `out` already holds a synthetic set made with the same settings, nothing is done. A
    different hiposeg dataset needs `overwrite=True` (which removes only what hiposeg wrote there);
    a non-empty folder that is not a hiposeg dataset is never written to.
    """
    out = Path(out)
    if train < 1 or val < 1:
        raise UserError(f"--train {train} / --val {val}: both splits need at least 1 image")
    if size < 32:
        raise UserError(f"--size {size} is too small to draw objects with parts; use at least 32")
    options = {"train": train, "val": val, "size": size, "seed": seed}
    state = inspect_output(out, strict=not overwrite)
    if _holds_this_set(state, options) and not overwrite:
        return Generated(out, state.manifest, True, [])  # type: ignore[arg-type]
    _check_target(state, options, overwrite)  # before the lock creates anything in `out`
    h = Hierarchy.load("synthetic")
    header = {"journal": JOURNAL_FORMAT, "source": "synthetic", "raw_root": None, "hierarchy_name": h.name,
              "hierarchy_sha256": h.sha256, "options": options}
    command = "hiposeg prepare synthetic --out " + str(out) + "".join(f" --{k} {v}" for k, v in options.items())
    with DirectoryLock(out, "prepared dataset folder"), output_errors(out, command):
        state = inspect_output(out, strict=not overwrite)
        if _holds_this_set(state, options) and not overwrite:  # another process made it meanwhile
            return Generated(out, state.manifest, True, [])  # type: ignore[arg-type]
        _check_target(state, options, overwrite)
        remove_scratch(out)
        check_split_dirs_inside(out, SPLIT_CODES)
        kept = clear_prepared(state, header) if state.entries else []
        Journal.create(out / JOURNAL_NAME, header)
        manifest = _write_set(out, h, options, workers=workers, quiet=quiet)
    return Generated(out, manifest, False, kept)


def _holds_this_set(state: OutputFolder, options: dict[str, Any]) -> bool:
    m = state.manifest
    return m is not None and m["source"] == "synthetic" and m["options"] == options


def _check_target(state: OutputFolder, options: dict[str, Any], overwrite: bool) -> None:
    """`out` may be (re)made: empty, a hiposeg dataset with --overwrite, or this set's interrupted build."""
    check_may_write(state, "data/synthetic")
    interrupted = state.manifest is None and state.journal_header is not None \
        and state.journal_header["source"] == "synthetic" and state.journal_header["options"] == options
    if not state.entries or overwrite or interrupted:
        return
    was = state.manifest["options"] if state.source == "synthetic" and state.manifest else f"a {state.source} dataset"
    raise UserError(f"{state.path} already holds a prepared dataset ({was}), not the synthetic set with {options}",
                    hint="Add --overwrite to replace it (hiposeg removes only the files it wrote), or choose "
                         "another --out.")


def _write_set(out: Path, h: Hierarchy, options: dict[str, Any], *, workers: int | None,
               quiet: bool) -> dict[str, Any]:
    """Render every image into `out` (in parallel), then hierarchy.json, then the manifest."""
    train, val = options["train"], options["val"]
    f2c = np.zeros(256, np.uint8)
    f2c[: h.num_fine] = h.fine_to_coarse
    f2c[h.ignore_index] = h.ignore_index
    job = SynthJob(out, options["size"], options["seed"], {n: i for i, n in enumerate(h.names(h.fine_level))}, f2c,
                   h.ignore_index)
    tasks = [(split, i) for split, n in (("train", train), ("val", val)) for i in range(n)]
    fine = {s: np.zeros(h.num_fine, np.int64) for s in SPLIT_CODES}
    coarse = {s: np.zeros(h.num_coarse, np.int64) for s in SPLIT_CODES}
    ignore = dict.fromkeys(SPLIT_CODES, 0)
    n_workers = min(workers or default_workers(), len(tasks))
    with WorkerPool(n_workers, _init_synth, (job,)) as pool, progress_bar(quiet) as bar:
        task = bar.add_task("synthetic", total=len(tasks))
        for rec in pool.imap_unordered(_make_in_worker, tasks):
            for k, v in rec["fine"].items():
                fine[rec["split"]][int(k)] += v
            for k, v in rec["coarse"].items():
                coarse[rec["split"]][int(k)] += v
            ignore[rec["split"]] += rec["ignore"]
            bar.advance(task)
    splits = {s: {"images": n, "pixels": {"fine": dict(zip(h.names(h.fine_level), fine[s].tolist())),
                                          "coarse": dict(zip(h.names(h.coarse_level), coarse[s].tolist())),
                                          "ignore": ignore[s]},
                  "unknown_values": {}, "skipped": []}
              for s, n in (("train", train), ("val", val))}
    atomic_write_json(out / HIERARCHY_NAME, h.to_dict())
    manifest = manifest_dict(source="synthetic", raw_root=None, hierarchy=h, options=options, splits=splits,
                             missing_splits=[])
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest
