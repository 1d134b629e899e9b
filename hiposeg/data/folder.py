"""A user's own images + masks -> prepared dataset (`hiposeg prepare folder RAW --hierarchy FILE`).

Layouts (masks are matched to images by file stem; sub-folders below these are not searched):

    RAW/{split}/images/*.{jpg,png,...}  +  RAW/{split}/masks/*.png     one split per sub-folder
    RAW/images/*                        +  RAW/masks/*.png             split by --val-fraction

(`labels/` or `annotations/` are accepted for `masks/`.) A mask is either

* an **index** PNG (8/16-bit grayscale, or a palette PNG read as its indices): pixel values are raw
  values of the hierarchy (its `raw` lists, or the leaf ids when it has none), or
* a **colour** PNG (RGB/RGBA, 8 or 16 bits per channel; alpha is not read): each colour must be a
  leaf class colour of the hierarchy; any other colour is an error naming it as stored in the file
  (or, with `--unknown ignore`, maps to ignore and is counted). A 16-bit colour matches the 8-bit
  class colour c when it stores c * 257 (the exact 16-bit form of c, as image editors save it).

A grey+alpha PNG is an index map with an alpha channel: read as its grey values when every pixel is
opaque, else refused (see `codecs.read_label_file`).

With a flat layout, `--val-fraction F` (default 0.1) sends each image to `val` with probability F,
decided by a hash of (seed, stem): the same files always land in the same split, and adding files
does not move the others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np

from hiposeg.data.codecs import IMAGE_EXTS, BadFile, read_label_file
from hiposeg.data.options import COMMON_FLAGS, HIERARCHY, OUT, Flag
from hiposeg.data.sources import (Decoded, Discovery, Item, Source, check_dir, describe_dir, list_files, list_subdirs,
                                  pair_by_stem, partner_in)
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.hierarchy_spec import MAX_RAW_VALUE

MASK_DIRS = ("masks", "labels", "annotations")
EXPECTED = ("RAW/{train,val,...}/images/* + RAW/{train,val,...}/masks/*.png, or RAW/images/* + RAW/masks/*.png "
            "(split by --val-fraction)")


@dataclass
class Folder(Source):
    """Your own images + masks, with your hierarchy.

    Expected layout (masks pair with images by file stem):

      RAW/SPLIT/images/* + RAW/SPLIT/masks/*.png   one split per folder
      RAW/images/*       + RAW/masks/*.png         split by --val-fraction

    ("labels/" or "annotations/" may stand for "masks/".) A mask is either an
    index PNG (8/16-bit gray, or a palette PNG read as indices) holding the
    hierarchy's raw values (its leaf ids if it lists none), or a colour PNG
    whose colours are the hierarchy's leaf colours. Any other value or colour
    is an error naming it (--unknown ignore maps it to ignore).
    """

    val_fraction: float | None = None  # flat layout only; None -> 0.1
    seed: int = 0

    name: ClassVar[str] = "folder"
    default_hierarchy: ClassVar[str] = ""  # required: --hierarchy FILE
    splits: ClassVar[tuple[str, ...]] = ()  # whatever sub-folders RAW has
    DEFAULT_VAL_FRACTION: ClassVar[float] = 0.1
    flags: ClassVar[tuple[Flag, ...]] = (
        replace(HIERARCHY, type=str, help="Your hierarchy JSON file (README: 'Hierarchy files').", required=True,
                show_default=False),
        replace(OUT, help="Prepared dataset folder (default: data/NAME-OF-RAW)."),
        Flag("val_fraction", Optional[float], "Flat layout only: share of images sent to val (default 0.1), by a hash "
                                              "of (seed, file stem).", decls=("--val-fraction",)),
        Flag("seed", int, "Seed of the --val-fraction split.", default=0),
        *[f for f in COMMON_FLAGS if f not in (OUT, HIERARCHY)],
    )

    def __post_init__(self) -> None:
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        self._layout = "split folders"

    def options(self) -> dict[str, Any]:
        if self._layout == "split folders":
            return {"layout": self._layout}
        return {"layout": self._layout, "val_fraction": self._fraction, "seed": self.seed}

    @property
    def _fraction(self) -> float:
        return self.DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction

    def command(self, raw: Path | str, out: Path | str) -> str:
        return f"hiposeg prepare folder {raw} --hierarchy FILE --out {out}"

    def default_out(self, raw: Path) -> Path:
        """data/NAME-OF-RAW: a dataset of your own is named after its folder."""
        return Path("data") / raw.resolve().name

    def reader(self, hierarchy: Hierarchy) -> ColourOrIndexReader:
        return ColourOrIndexReader.for_hierarchy(hierarchy)

    def discover(self, raw: Path) -> Discovery:
        if check_dir(raw / "images", "images"):
            mask_dir = _mask_dir(raw)
            if mask_dir is None:
                raise UserError(f"{raw}/images exists but no masks folder ({', '.join(MASK_DIRS)}) beside it",
                                hint=f"Expected {EXPECTED}.")
            return self._discover_flat(raw / "images", mask_dir)
        if self.val_fraction is not None:
            raise UserError(f"--val-fraction applies to a flat RAW/images + RAW/masks layout, but {raw} has no images/",
                            hint="With split sub-folders (RAW/train, RAW/val, ...) the folders define the splits.")
        found = Discovery(items={}, notes=["layout: one split per sub-folder"])
        for sub in list_subdirs(raw):
            mask_dir = _mask_dir(sub)
            if not check_dir(sub / "images", f"{sub.name}/images") or mask_dir is None:
                continue
            found.add_split(sub.name, list_files(sub / "images", IMAGE_EXTS), list_files(mask_dir, [".png"]),
                            partner_in(mask_dir, ".png"), partner_in(sub / "images", ".*"))
        if not found.items:
            raise UserError(f"no images/masks folders in {raw}: expected {EXPECTED}; found: {describe_dir(raw)}",
                            hint="Put each split's images in RAW/SPLIT/images and its masks (same file stems, .png) "
                                 "in RAW/SPLIT/masks.")
        if "val" not in found.items:
            found.missing_splits.append("val")
        return found

    def _discover_flat(self, image_dir: Path, mask_dir: Path) -> Discovery:
        self._layout = "flat"
        images, masks = list_files(image_dir, IMAGE_EXTS), list_files(mask_dir, [".png"])
        items, orphans = pair_by_stem("all", images, masks, partner_in(mask_dir, ".png"), partner_in(image_dir, ".*"))
        val = assign_val(sorted(it.stem for it in items), self._fraction, self.seed)
        by_split: dict[str, list[Item]] = {"train": [], "val": []}
        for it in items:
            split = "val" if it.stem in val else "train"
            by_split[split].append(Item(split, it.stem, it.image, it.label))
        for o in orphans:
            o.split = "train"
        found = Discovery(items={k: v for k, v in by_split.items() if v or k == "train"}, orphans=orphans,
                          notes=[f"layout: flat; {len(val)} of {len(items)} images to val (--val-fraction "
                                 f"{self._fraction}, --seed {self.seed})"])
        if not by_split["val"]:
            found.missing_splits.append("val")
        return found


def _mask_dir(parent: Path) -> Path | None:
    return next((parent / d for d in MASK_DIRS if check_dir(parent / d, d)), None)


def assign_val(stems: list[str], fraction: float, seed: int) -> set[str]:
    """Stems sent to val: hash(seed, stem) < fraction; at least one when fraction > 0 and n >= 2."""
    if fraction <= 0 or not stems:
        return set()
    u = {s: int.from_bytes(hashlib.sha256(f"{seed}:{s}".encode()).digest()[:8], "big") / 2**64 for s in stems}
    val = {s for s in stems if u[s] < fraction}
    if not val and len(stems) >= 2:
        val = {min(stems, key=u.__getitem__)}
    return val


@dataclass(frozen=True)
class ColourOrIndexReader:
    """Index PNGs pass through; colour PNGs are mapped to a raw value per leaf colour."""

    colours: np.ndarray  # sorted packed 0xRRGGBB of the leaf classes
    codes: np.ndarray  # raw value standing for each of those colours
    unknown_code: int  # a raw value that maps to ignore, standing for unknown colours
    duplicates: tuple[str, ...]  # colours shared by several leaves (ambiguous in colour masks)

    @classmethod
    def for_hierarchy(cls, h: Hierarchy) -> ColourOrIndexReader:
        leaves = h.classes(h.level_names[0])
        leaf_raw: dict[int, int] = {}
        for raw, leaf in sorted(h.raw_to_leaf().items()):
            leaf_raw.setdefault(leaf, raw)
        packed: dict[int, int] = {}
        dup: list[str] = []
        for c in leaves:
            if c.id not in leaf_raw:
                continue
            key = (c.color[0] << 16) | (c.color[1] << 8) | c.color[2]
            if key in packed:
                dup.append(f"rgb{tuple(c.color)}")
            packed.setdefault(key, leaf_raw[c.id])
        order = sorted(packed)
        return cls(np.array(order, np.uint32), np.array([packed[k] for k in order], np.int64), stand_in_code(h),
                   tuple(dup))

    def __call__(self, path: Path) -> Decoded:
        values = read_label_file(path)
        if values.ndim == 2:
            return Decoded(values)
        if self.duplicates:
            raise BadFile(path, f"is a colour mask, but the hierarchy gives the same colour to several classes "
                                f"({', '.join(self.duplicates[:4])}): give each leaf class its own colour, or use "
                                "index masks")
        bgr = values[..., :3]
        eight, exact = eight_bit_colours(bgr)
        packed = (eight[..., 2] << 16) | (eight[..., 1] << 8) | eight[..., 0]
        pos = np.searchsorted(self.colours, packed).clip(0, len(self.colours) - 1)
        hit = (self.colours[pos] == packed) & exact
        codes = np.where(hit, self.codes[pos], self.unknown_code)
        dtype = np.uint8 if max(int(self.codes.max(initial=0)), self.unknown_code) <= 255 else np.uint16
        return Decoded(codes.astype(dtype), unknown_colours(bgr[~hit]))


def eight_bit_colours(bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(8-bit channel values as uint32, where they are exact) of a decoded colour mask: 16-bit
    channels hold the 8-bit value c as c * 257; any other 16-bit value matches no class colour."""
    if bgr.dtype == np.uint8:
        return bgr.astype(np.uint32), np.ones(bgr.shape[:2], bool)
    return (bgr // 257).astype(np.uint32), (bgr % 257 == 0).all(axis=-1)


def unknown_colours(bgr: np.ndarray) -> dict[str, int]:
    """{"rgb(r,g,b)": pixels} for (N, 3) BGR pixels, with the values as stored (8- or 16-bit)."""
    if not len(bgr):
        return {}
    wide = bgr.astype(np.uint64)
    packed = (wide[:, 2] << 32) | (wide[:, 1] << 16) | wide[:, 0]
    cols, counts = np.unique(packed, return_counts=True)
    return {f"rgb({c >> 32},{(c >> 16) & 0xFFFF},{c & 0xFFFF})": int(n) for c, n in zip(cols.tolist(), counts)}


def stand_in_code(h: Hierarchy) -> int:
    """A raw value that maps to ignore, to stand for pixels of unknown colours: the first value the
    hierarchy does not know (with --unknown ignore, unknown values map to ignore), else its first
    raw ignore value. A hierarchy that maps all 65536 values to classes leaves none."""
    known = h.known_raw_values()
    free = next((v for v in range(MAX_RAW_VALUE + 1) if v not in known), None)
    if free is not None:
        return free
    if h.raw_ignore:
        return h.raw_ignore[0]
    raise UserError(f"hierarchy {h.name!r} maps every 16-bit raw value 0..{MAX_RAW_VALUE} to a class, so colour "
                    "masks have no value left for colours it does not know",
                    hint="List one raw value under raw.ignore, or use index masks.")
