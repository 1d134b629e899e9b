"""PASCAL-Part-108 -> prepared dataset. Two release layouts are recognised:

(a) **GMNet release** (LTTM/GMNet `data.zip`): images named by VOC id (`2008_000045.jpg` or
    `.png`), single-channel label PNGs named the same with values 0..107 (0 = background,
    255 = ignore), and split lists `train.txt` / `val.txt` (one VOC id per line). The folder names
    inside the zip are not documented, so the folders are found by content (up to 4 levels below
    RAW): a folder of VOC-id PNGs with one channel holds labels, one of VOC-id JPEGs or colour
    PNGs holds images, a folder with `train.txt`/`val.txt` of VOC ids holds the lists. When several
    label (or list) folders qualify (e.g. the 21/58/108 variants side by side) the one with "108" in
    its path wins. Colour PNGs inside a label folder tree (`label108/color/`: label visualisations)
    are not images; of the remaining image folders one named like RGB / JPEGImages / images / img
    wins. `--images/--labels/--lists DIR` name them explicitly otherwise.
(b) **Re-organised layout** (mmsegmentation/LogicSeg style):
    `RAW/img_dir/{train,val}/*.jpg` + `RAW/ann108_dir/{train,val}/*.png`.

Leaf ids are the GMNet class order (identity mapping; 255 = ignore). Stems: the VOC ids.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from hiposeg.data.codecs import IMAGE_EXTS, BadFile, open_regular, png_header, read_regular_bytes
from hiposeg.data.options import COMMON_FLAGS, Flag
from hiposeg.data.sources import (Discovery, Item, Source, check_dir, describe_dir, list_files, partner_in,
                                  split_folders)
from hiposeg.errors import UserError

VOC_ID = re.compile(r"^\d{4}_\d{6}$")
LABEL_TREE = re.compile(r"^(label|ann|gt|ground_?truth)", re.IGNORECASE)  # label108/, Ground_truth_parts/, ...
IMAGE_DIR_NAMES = {"rgb", "jpegimages", "images", "image", "imgs", "img"}
SPLITS = ("train", "val")
MAX_DEPTH = 4
EXPECTED = ("either (a) the GMNet release: images named by VOC id (e.g. 2008_000045.jpg), single-channel label PNGs "
            "with the same names (values 0..107, 255 = ignore) and split lists train.txt / val.txt, in folders up to "
            f"{MAX_DEPTH} levels below RAW; or (b) RAW/img_dir/{{train,val}}/*.jpg + RAW/ann108_dir/{{train,val}}/*.png")


@dataclass
class PascalPart(Source):
    """PASCAL-Part-108 (108 parts in 21 objects).

    Expected layout, either

      (a) the GMNet release: images named by VOC id (2008_000045.jpg or .png),
          one-channel label PNGs with the same names (0..107, 255 = ignore)
          and split lists train.txt / val.txt, in folders up to 4 levels
          below RAW (found by content, or named with --images/--labels/--lists)
      (b) RAW/img_dir/{train,val}/*.jpg + RAW/ann108_dir/{train,val}/*.png
    """

    images: Path | None = None  # GMNet layout: folder of images (relative to RAW or absolute)
    labels: Path | None = None  # GMNet layout: folder of 108-part label PNGs
    lists: Path | None = None  # GMNet layout: folder with train.txt / val.txt

    name: ClassVar[str] = "pascal-part"
    default_hierarchy: ClassVar[str] = "pascal_part_108"
    label_expected: ClassVar[str] = "PASCAL-Part-108 labels: 8-bit one-channel PNG, 0..107 and 255 = ignore"
    flags: ClassVar[tuple[Flag, ...]] = (
        *COMMON_FLAGS,
        Flag("images", Optional[Path], "GMNet layout: the images folder (relative to RAW), if detection is ambiguous."),
        Flag("labels", Optional[Path], "GMNet layout: the 108-part label folder."),
        Flag("lists", Optional[Path], "GMNet layout: the folder with train.txt / val.txt."),
    )

    def __post_init__(self) -> None:
        self._layout: dict[str, str] = {}

    def options(self) -> dict[str, Any]:
        return dict(self._layout)

    def discover(self, raw: Path) -> Discovery:
        if check_dir(raw / "img_dir", "img_dir") and check_dir(raw / "ann108_dir", "ann108_dir") \
                and not (self.images or self.labels or self.lists):
            return self._discover_reorganised(raw)
        return self._discover_gmnet(raw)

    # ---- (b) img_dir/ + ann108_dir/ ------------------------------------------------------

    def _discover_reorganised(self, raw: Path) -> Discovery:
        self._layout = {"layout": "img_dir/ann108_dir"}
        found = Discovery(items={}, notes=["layout: img_dir/{train,val} + ann108_dir/{train,val}"])
        for split in SPLITS:
            img_dir, ann_dir = raw / "img_dir" / split, raw / "ann108_dir" / split
            if not split_folders(found, split, img_dir, ann_dir, raw, EXPECTED):
                continue
            found.add_split(split, list_files(img_dir, IMAGE_EXTS), list_files(ann_dir, [".png"]),
                            partner_in(ann_dir, ".png"), partner_in(img_dir, ".jpg"))
        if not found.items:
            raise UserError(f"{raw}/img_dir and ann108_dir have no train/ or val/ folder", hint=f"Expected {EXPECTED}.")
        return found

    # ---- (a) GMNet release ---------------------------------------------------------------

    def _discover_gmnet(self, raw: Path) -> Discovery:
        image_dirs, label_dirs, list_dirs = scan_release(raw)
        label_dir = self._choose(raw, self.labels, label_dirs, "label PNGs (one channel)", "--labels", prefer_108)
        trees = {label_tree(raw, d) for d in [*label_dirs, label_dir]} - {raw}
        photos = [d for d in image_dirs if not (_holds_png(d) and any(d.is_relative_to(t) for t in trees))]
        what = "images"
        if image_dirs and not photos:
            what += (f" (colour PNGs in {', '.join(os.path.relpath(d, raw) for d in image_dirs[:6])} are taken as "
                     "label visualisations: they sit in a label folder)")
        image_dir = self._choose(raw, self.images, photos, what, "--images", has_image_dir_name)
        lists_dir = self._choose(raw, self.lists, list_dirs, "split lists train.txt/val.txt", "--lists", prefer_108)
        images, labels = list_files(image_dir, IMAGE_EXTS), list_files(label_dir, [".png"])
        rel = {k: os.path.relpath(v, raw) for k, v in (("images", image_dir), ("labels", label_dir), ("lists", lists_dir))}
        self._layout = {"layout": "gmnet", **rel}
        found = Discovery(items={}, notes=[f"layout: GMNet release (images {rel['images']}/, labels {rel['labels']}/, "
                                           f"lists {rel['lists']}/)"])
        for split in SPLITS:
            list_file = lists_dir / f"{split}.txt"
            if not list_file.exists():  # a FIFO or folder of that name is an error in read_split_list
                found.missing_splits.append(split)
                continue
            stems = read_split_list(list_file)
            found.items[split] = [Item(split, s, images[s], labels[s]) for s in stems if s in images and s in labels]
            for s in stems:
                if s not in labels:
                    found.orphans.append(BadFile(label_dir / f"{s}.png", f"listed in {list_file} but missing", split))
                elif s not in images:
                    found.orphans.append(BadFile(image_dir / f"{s}.jpg", f"listed in {list_file} but no image "
                                                 f"{s}.* in {image_dir}", split))
        return found

    def _choose(self, raw: Path, given: Path | None, candidates: list[Path], what: str, flag: str,
                prefer: Callable[[Path, Path], bool]) -> Path:
        """The folder named by `flag`, else the only candidate, else the only one `prefer` picks."""
        if given is not None:
            path = given if given.is_absolute() else raw / given
            if not check_dir(path, flag):
                raise UserError(f"{flag} {given}: folder {path} not found")
            return path
        if not candidates:
            raise UserError(f"no PASCAL-Part-108 release in {raw}: found no folder of {what}. Expected {EXPECTED}; "
                            f"found: {describe_dir(raw)}",
                            hint=f"If the files are there under other names, point at them with {flag} DIR.")
        preferred = [c for c in candidates if prefer(raw, c)] or candidates
        if len(preferred) > 1:
            shown = ", ".join(os.path.relpath(c, raw) for c in preferred[:6])
            raise UserError(f"several folders under {raw} hold {what}: {shown}",
                            hint=f"Pick the folder of PASCAL-Part-108 {what} with {flag} DIR (relative to RAW).")
        return preferred[0]


def prefer_108(raw: Path, folder: Path) -> bool:
    """Label and list folders of the 21/58/108 variants sit side by side: take the 108 one."""
    return "108" in os.path.relpath(folder, raw)


def has_image_dir_name(raw: Path, folder: Path) -> bool:
    return folder.name.lower() in IMAGE_DIR_NAMES


def label_tree(raw: Path, label_dir: Path) -> Path:
    """The innermost folder named like label*/ann*/gt*/ground_truth* that holds `label_dir` (label108/
    for label108/gray/all, also inside a wrapper such as Labeled_PascalPart/), else `label_dir`:
    colour PNGs in it are label visualisations, not images."""
    rel = label_dir.relative_to(raw).parts if label_dir.is_relative_to(raw) else ()
    matches = [i for i, part in enumerate(rel) if LABEL_TREE.match(part)]
    return raw.joinpath(*rel[:matches[-1] + 1]) if matches else label_dir


def _holds_png(folder: Path) -> bool:
    """Whether a folder's VOC-id images are PNGs (a JPEG folder is never a label visualisation)."""
    return any(f.endswith(".png") and VOC_ID.match(f[:-4]) for f in os.listdir(folder))


def scan_release(raw: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Folders (depth <= MAX_DEPTH, symlinks not followed) holding VOC-id images, VOC-id label
    PNGs, and VOC-id split lists."""
    image_dirs, label_dirs, list_dirs = [], [], []
    base = len(raw.parts)
    for dirpath, dirnames, filenames in os.walk(raw):
        depth = len(Path(dirpath).parts) - base
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < MAX_DEPTH else []
        voc = sorted(f for f in filenames if VOC_ID.match(os.path.splitext(f)[0])
                     and os.path.splitext(f)[1].lower() in IMAGE_EXTS)
        if voc:
            first = Path(dirpath) / voc[0]
            (label_dirs if _is_index_png(first) else image_dirs).append(Path(dirpath))
        if any(f in ("train.txt", "val.txt") and _is_voc_list(Path(dirpath) / f) for f in filenames):
            list_dirs.append(Path(dirpath))
    return image_dirs, label_dirs, list_dirs


def _is_index_png(path: Path) -> bool:
    try:
        with open_regular(path) as f:
            header = png_header(f.read(32))
    except (OSError, BadFile):
        return False
    return header is not None and header.is_index_map


def _is_voc_list(path: Path) -> bool:
    try:
        with open_regular(path) as f:
            first = next((line.split()[0] for line in f if line.strip()), b"").decode("utf-8", "replace")
    except (OSError, BadFile):
        return False
    return bool(VOC_ID.match(first))


def read_split_list(path: Path) -> list[str]:
    try:
        lines = read_regular_bytes(path).decode("utf-8").splitlines()
    except (OSError, BadFile, UnicodeDecodeError) as e:
        raise UserError(f"cannot read split list {path}: {e}") from None
    stems = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        stem = line.split()[0]
        if not VOC_ID.match(stem):
            raise UserError(f"{path}, line {n}: {stem!r} is not a VOC id (YYYY_NNNNNN)",
                            hint="Split lists hold one VOC image id per line.")
        stems.append(stem)
    return stems
