"""Loading a prepared dataset (README "Preparing data") for training, evaluation and scoring.

    DATA/hierarchy.json, DATA/manifest.json
    DATA/{split}/images/{stem}.{ext}   DATA/{split}/fine/{stem}.png   DATA/{split}/coarse/{stem}.png

`PreparedDataset[i]` or `PreparedDataset[(i, seed)]` gives one sample; with a seed the random
augmentation is a pure function of (i, seed), whichever worker process draws it, which is what
an exactly resumable training run needs. Decoding is OpenCV (one thread per loader worker);
images stay uint8 until the transforms' last step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torchvision import tv_tensors

from hiposeg.data.codecs import (BadFile, decode_image, encode_png, max_pixels, open_regular, read_label_file,
                                 read_regular_bytes)
from hiposeg.data.layout import JOURNAL_NAME
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.atomic import atomic_write_bytes
from hiposeg.safeload import load_json

LEVELS = ("fine", "coarse")


# ---- label and image files -------------------------------------------------------------------


def read_label(path: Path) -> np.ndarray:
    """A label PNG as written by `prepare` (or by another tool): grayscale values, or the indices of
    a palette PNG. Colour PNGs come back as (H, W, C) arrays for the caller to reject."""
    try:
        return read_label_file(Path(path))
    except BadFile as e:
        raise UserError(f"cannot read label map {e.file}: {e.reason}",
                        hint="Prepare the dataset again (`hiposeg prepare ... --overwrite`), or replace the file.") from None


def write_label(path: Path, labels: np.ndarray) -> None:
    """Atomically write a 2-D uint8/uint16 label map as PNG."""
    if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"label maps are 2-D uint8/uint16 arrays, got {labels.dtype} {labels.shape}")
    atomic_write_bytes(path, encode_png(labels))


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) in stored pixel order: EXIF orientation is not applied, because label maps
    (and the sizes `prepare` read from the headers) are in that order too. A regular file only (a FIFO
    would block the loader forever), within the pixel limit (`codecs.max_pixels`)."""
    try:
        return decode_image(Path(path), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    except BadFile as e:
        missing = not os.path.exists(path)  # e.g. a link whose raw file moved: no reason but the link
        target = f" (a link to {os.readlink(path)}: was the raw release moved?)" if os.path.islink(path) else ""
        raise UserError(f"cannot read image {path}{target}" + ("" if missing else f": {e.reason}"),
                        hint="Prepare the dataset again with --overwrite (add --copy to keep copies instead of "
                             "links).") from None


# ---- the prepared folder ---------------------------------------------------------------------


def prepare_command(root: Path, dataset: str | None = None) -> str:
    """The command that (re)creates `root`, from its unfinished journal, else the recipe's `dataset`
    name (`train --dataset ade20k --data DIR`), else the folder name."""
    from hiposeg.data.registry import SOURCES, SYNTHETIC, command_for_dataset

    journal = root / JOURNAL_NAME
    if journal.exists():
        try:
            with open_regular(journal) as f:  # a FIFO there must not block
                header = load_json(f.readline(), str(journal))
            return f"hiposeg prepare {header['source']} {header['raw_root']} --out {root}"
        except (OSError, ValueError, KeyError, TypeError, UserError, BadFile):
            pass
    name = command_for_dataset(dataset or "") or command_for_dataset(root.name)
    if name == SYNTHETIC:
        return "hiposeg prepare synthetic" + ("" if root == Path("data/synthetic") else f" --out {root}")
    if name is not None:
        return f"hiposeg prepare {name} RAW --out {root}"
    return f"hiposeg prepare {{{','.join(SOURCES)}}} RAW --out {root}"


def open_prepared(root: Path, split: str | None = None, dataset: str | None = None) -> tuple[Hierarchy, dict[str, Any]]:
    """Load DATA/hierarchy.json and DATA/manifest.json; a UserError naming the `hiposeg prepare`
    command to run (for `dataset`, the recipe name, when given) when the folder or the split is missing."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        if (root / JOURNAL_NAME).exists():
            raise UserError(f"preparing {root} did not finish (no manifest.json yet)",
                            hint=f"Rerun `{prepare_command(root, dataset)}` to complete it (finished files are kept).")
        raise UserError(f"no prepared dataset at {root}: run `{prepare_command(root, dataset)}`",
                        hint="`hiposeg prepare --help` lists the sources; DATA defaults to data/DATASET.")
    fix = f"Prepare the dataset again: `{prepare_command(root, dataset)}` with --overwrite."
    try:
        manifest = load_json(read_regular_bytes(manifest_path), str(manifest_path), hint=fix)
    except OSError as e:
        raise UserError(f"{manifest_path} is unreadable ({e.strerror or e})", hint=fix) from None
    except BadFile as e:  # a FIFO or device: never opened for a blocking read
        raise UserError(f"{e.file} {e.reason}", hint=fix) from None
    if not isinstance(manifest, dict):
        raise UserError(f"{manifest_path} is not a hiposeg manifest (a JSON object)", hint=fix)
    hierarchy = Hierarchy.from_file(root / "hierarchy.json")  # a regular file only (not a pipe)
    if manifest.get("hierarchy", {}).get("sha256") not in (None, hierarchy.sha256):
        raise UserError(f"{root}/hierarchy.json does not match manifest.json (edited after preparing?)",
                        hint=f"Prepare the dataset again: `{prepare_command(root, dataset)}` with --overwrite.")
    if split is not None and split not in manifest.get("splits", {}):
        have = ", ".join(manifest.get("splits", {})) or "none"
        missing = split in manifest.get("missing_splits", [])
        why = " (the raw release did not contain it)" if missing else ""
        raise UserError(f"{root} has no split {split!r}{why}; it has: {have}",
                        hint=f"Use one of those splits, or prepare a release that has {split!r}: "
                             f"`{prepare_command(root, dataset)}`.")
    return hierarchy, manifest


def moved_dataset_error(root: Path, whose: str, dataset: str | None = None) -> UserError:
    """The data folder a run or model recorded (`whose`: e.g. "the data recorded in MODEL") holds no
    prepared dataset now: the fix is --data first (the data moved), then preparing it again there."""
    where = Path(os.path.abspath(root))
    relative = "" if Path(root).is_absolute() else " (recorded relative to the folder the run was started in)"
    return UserError(f"no prepared dataset at {where}{relative}, {whose}",
                     hint="Pass --data DIR with the folder the prepared dataset is in now; or prepare it again there: "
                          f"`{prepare_command(where, dataset)}`.")


def prepared_dataset_at(path: Path) -> Path | None:
    """The prepared dataset `path` lies in (itself or an ancestor holding hiposeg's manifest.json and
    hierarchy.json, or the journal of an unfinished `prepare`), after resolving links; else None."""
    for d in (Path(path).resolve(), *Path(path).resolve().parents):
        if (d / JOURNAL_NAME).is_file() or ((d / "manifest.json").is_file() and (d / "hierarchy.json").is_file()):
            return d
    return None


def refuse_prepared_dataset(path: Path, what: str) -> None:
    """hiposeg never writes into a prepared dataset: its label maps are the ground truth that `eval`
    scores against, so a prediction written there would make the next evaluation meaningless."""
    root = prepared_dataset_at(path)
    if root is not None:
        raise UserError(f"{what} {path} is inside the prepared dataset {root}: hiposeg never writes into a prepared "
                        "dataset (its label maps are the ground truth)",
                        hint="Choose a folder outside the dataset.")


def check_label_values(labels: np.ndarray, num_classes: int, ignore_index: int, path: Path) -> None:
    """Refuse a label map holding values that are neither a class (0..K-1) nor the ignore value
    (CrossEntropy would fail later with an IndexError that names no file)."""
    above = labels >= num_classes
    if not above.any():
        return
    bad = labels[above]
    bad = bad[bad != ignore_index]
    if bad.size:
        from hiposeg.metrics import describe_values

        values, counts = np.unique(bad, return_counts=True)
        raise UserError(f"label map {path} holds values that are neither a class (0..{num_classes - 1}) nor the "
                        f"ignore value {ignore_index}: {describe_values(dict(zip(values.tolist(), counts.tolist())))}",
                        hint=f"Restore the file, or prepare the dataset again: `{prepare_command(path.parents[2])}` "
                             "with --overwrite.")


class PreparedDataset(torch.utils.data.Dataset):
    """One split of a prepared dataset.

    Items: `{"image": float32 (3,H,W) normalised, "fine": int64 (H,W), "coarse": int64 (H,W),
    "stem": str}` with the given transforms (only the requested `levels`); without transforms the
    image is uint8 (3,H,W) as decoded. A key is an index, or `(index, seed)`: then the random
    transforms run under a forked torch RNG seeded with `seed`. With `check_values`, a label value that
    is neither a class of its level nor ignore is an error naming the file (training; evaluation
    counts such values itself, see `metrics.ConfusionMatrix`).
    """

    def __init__(self, root: Path, split: str, transforms: Callable[[dict], dict] | None = None,
                 levels: tuple[str, ...] = LEVELS, check_values: bool = False) -> None:
        bad = [lv for lv in levels if lv not in LEVELS]
        if bad or not levels:
            raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
        self.root, self.split = Path(root), split
        max_pixels()  # a bad $HIPOSEG_MAX_PIXELS is reported here, not from a loader worker
        self.hierarchy, self.manifest = open_prepared(self.root, split)
        self.transforms, self.levels = transforms, tuple(levels)
        h = self.hierarchy
        self._num_classes = {"fine": h.num_fine, "coarse": h.num_classes(h.coarse_level)} if check_values else {}
        base = self.root / split
        self.stems: list[str] = sorted(p[:-4] for p in os.listdir(base / "fine") if p.endswith(".png")
                                       and not p.startswith(".")) if (base / "fine").is_dir() else []
        images = {os.path.splitext(n)[0]: n for n in os.listdir(base / "images")
                  if not n.startswith(".")} if (base / "images").is_dir() else {}
        missing = [s for s in self.stems if s not in images]
        if missing or not self.stems:
            what = f"{len(missing)} images are missing, e.g. {base / 'images' / missing[0]}.*" if missing \
                else f"{base / 'fine'} holds no label maps"
            raise UserError(f"prepared split {base} is incomplete: {what}",
                            hint=f"Prepare it again: `{prepare_command(self.root)}`.")
        self._image_files = [images[s] for s in self.stems]
        self._cv2_ready_pid: int | None = None

    def __len__(self) -> int:
        return len(self.stems)

    def image_files(self) -> list[Path]:
        """The split's image files, in item order."""
        return [self.root / self.split / "images" / name for name in self._image_files]

    def load(self, index: int) -> dict[str, Any]:
        """The decoded sample as tv_tensors (uint8 image, label maps as masks)."""
        if self._cv2_ready_pid != os.getpid():  # once per process: loader workers decode single-threaded
            if torch.utils.data.get_worker_info() is not None:
                cv2.setNumThreads(0)
            self._cv2_ready_pid = os.getpid()
        stem = self.stems[index]
        base = self.root / self.split
        image = read_image(base / "images" / self._image_files[index])
        sample: dict[str, Any] = {"image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))}
        for level in self.levels:
            lab = read_label(base / level / f"{stem}.png")
            if lab.shape[:2] != image.shape[:2] or lab.ndim != 2:
                raise UserError(f"{base / level / (stem + '.png')} is {lab.shape[1]}x{lab.shape[0]} but its image is "
                                f"{image.shape[1]}x{image.shape[0]}", hint=f"Prepare again: `{prepare_command(self.root)}`.")
            if self._num_classes:
                check_label_values(lab, self._num_classes[level], self.hierarchy.ignore_index,
                                   base / level / f"{stem}.png")
            if lab.dtype == np.uint16:  # torch ops on uint16 are limited; ids fit int32
                lab = lab.astype(np.int32)
            sample[level] = tv_tensors.Mask(torch.from_numpy(lab))
        sample["stem"] = stem
        return sample

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = (key if isinstance(key, tuple) else (key, None))
        sample = self.load(int(index))
        if self.transforms is not None:
            if seed is None:
                sample = self.transforms(sample)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
                    sample = self.transforms(sample)
        out: dict[str, Any] = {"image": sample["image"].as_subclass(torch.Tensor), "stem": sample["stem"]}
        for level in self.levels:
            out[level] = sample[level].as_subclass(torch.Tensor).to(torch.int64)
        return out
