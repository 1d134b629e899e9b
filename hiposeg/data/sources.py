"""What a converter is: the `Source` base class, the items it discovers, and the helpers that find them.

One converter module per release (`cityscapes.py`, `ade20k.py`, ...) subclasses `Source`: it
*discovers* the (image, label) pairs of its layout, says how its label files are decoded, and
declares its `hiposeg prepare` sub-command (its docstring is the help, `flags` its options). The
helpers below turn what a person can get wrong in a RAW tree (a missing half of a split, two files
with one stem, a symlink loop) into a UserError naming the path and the fix.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from hiposeg.data.codecs import BadFile, read_label_file
from hiposeg.data.layout import check_output_name, check_split_name, plain_name
from hiposeg.data.options import COMMON_FLAGS, Flag
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy

RAW_NAME_HINT = "Rename the file or folder in RAW."


@dataclass(frozen=True)
class Item:
    """One (image, label) pair to prepare; its split and stem name the output files."""

    split: str
    stem: str
    image: Path
    label: Path

    def __post_init__(self) -> None:
        plain_name(self.split, "split", self.image, RAW_NAME_HINT)
        plain_name(self.stem, "file stem", self.image, RAW_NAME_HINT)
        check_split_name(self.split, self.image, RAW_NAME_HINT)
        longest = max((self.stem + self.image.suffix, self.stem + ".png"), key=lambda n: len(os.fsencode(n)))
        check_output_name(longest, self.image, "raw file")


@dataclass
class Discovery:
    """What a source found under RAW."""

    items: dict[str, list[Item]]  # output split -> items sorted by stem
    missing_splits: list[str] = field(default_factory=list)
    orphans: list[BadFile] = field(default_factory=list)  # files without their partner
    notes: list[str] = field(default_factory=list)  # e.g. which layout was detected

    def add_split(self, split: str, images: dict[str, Path], labels: dict[str, Path],
                  label_for: Callable[[Path], Path], image_for: Callable[[Path], Path]) -> None:
        """Pair a split's files by stem (see `pair_by_stem`): its items, and its files without a partner."""
        items, orphans = pair_by_stem(split, images, labels, label_for, image_for)
        self.items[split] = items
        self.orphans += orphans


def split_folders(found: Discovery, split: str, image_dir: Path, label_dir: Path, raw: Path, expected: str) -> bool:
    """Whether a split's image and label folders both exist. A split with neither is recorded as
    missing (a release may ship only some splits); one with only one of them is an error."""
    has_image = check_dir(image_dir, str(image_dir.relative_to(raw)))
    has_label = check_dir(label_dir, str(label_dir.relative_to(raw)))
    if not has_image and not has_label:
        found.missing_splits.append(split)
        return False
    if not has_image or not has_label:
        missing, present = (image_dir, label_dir) if not has_image else (label_dir, image_dir)
        raise UserError(f"{missing} is missing but {present} exists",
                        hint=f"Expected {expected}. Unpack the missing part of the release.")
    return True


def check_dir(path: Path, what: str) -> bool:
    """True if `path` is a directory; UserError for a symlink loop or a broken link."""
    if path.is_dir():
        return True
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"symlink loop in RAW: {path} ({what}) points back to itself",
                                hint="Fix or remove that link (`ls -l` shows where it points).") from None
            raise UserError(f"broken symlink in RAW: {path} ({what}) -> {os.readlink(path)}",
                            hint="Point the link at the real folder, or remove it.") from None
    return False


def list_files(directory: Path, suffixes: Iterable[str], strip: str = "") -> dict[str, Path]:
    """{stem: path} of the files in `directory` (not recursive) whose name ends with one of
    `suffixes` (case-insensitive); `strip` removes a fixed name ending from the stem. Two files with
    one stem (`t0.jpg` and `t0.png`) are a UserError naming both: files pair by stem."""
    suffixes = tuple(s.lower() for s in suffixes)
    out: dict[str, Path] = {}
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot list {directory}: {e.strerror or e}") from None
    for e in entries:
        name = e.name
        if name.startswith(".") or not name.lower().endswith(suffixes):
            continue
        stem = name[: -len(strip)] if strip and name.endswith(strip) else os.path.splitext(name)[0]
        add_unique(out, stem, Path(e.path))
    return out


def add_unique(files: dict[str, Path], stem: str, path: Path) -> None:
    """files[stem] = path; a UserError naming both files if the stem is taken already."""
    if stem in files:
        raise UserError(f"two files with the stem {stem!r}: {files[stem]} and {path}; hiposeg pairs images and "
                        "labels by file stem, so it cannot tell which one to use",
                        hint="Remove or rename one of them (or move it out of RAW).")
    files[stem] = path


def list_subdirs(directory: Path) -> list[Path]:
    """Sub-folders (not hidden), sorted; links that loop or dangle are a UserError."""
    try:
        entries = [Path(e.path) for e in os.scandir(directory) if not e.name.startswith(".")]
    except OSError as e:
        raise UserError(f"cannot list {directory}: {e.strerror or e}") from None
    return sorted(p for p in entries if check_dir(p, "folder"))


def pair_by_stem(split: str, images: dict[str, Path], labels: dict[str, Path], label_for: Callable[[Path], Path],
                 image_for: Callable[[Path], Path]) -> tuple[list[Item], list[BadFile]]:
    """Items for stems present on both sides; a BadFile for each file without its partner, naming
    the partner path that was expected (`label_for(image)`, `image_for(label)`)."""
    items = [Item(split, s, images[s], labels[s]) for s in sorted(images.keys() & labels.keys())]
    orphans = [BadFile(images[s], f"missing partner: no label {label_for(images[s])}", split)
               for s in sorted(images.keys() - labels.keys())]
    orphans += [BadFile(labels[s], f"missing partner: no image {image_for(labels[s])}", split)
                for s in sorted(labels.keys() - images.keys())]
    return items, orphans


def partner_in(directory: Path, suffix: str) -> Callable[[Path], Path]:
    """`path -> directory / (stem + suffix)`, for `pair_by_stem` messages."""
    return lambda p: directory / (p.stem + suffix)


def describe_dir(path: Path, limit: int = 8) -> str:
    """A short listing for 'found: ...' in layout errors."""
    try:
        names = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(path) if not e.name.startswith("."))
    except OSError:
        return "(cannot list)"
    if not names:
        return "(empty)"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more

@dataclass(frozen=True)
class Decoded:
    """A label map in raw values. `unknown`, when given, names what the reader could not map
    (e.g. colours of a colour mask) and replaces the value-based report."""

    values: np.ndarray
    unknown: dict[str, int] | None = None


@dataclass(frozen=True)
class IndexLabelReader:
    """Single-channel label PNGs: 8/16-bit grayscale, or palette PNGs read as indices."""

    expected: str  # what a label file of this source is, for the message on a colour PNG

    def __call__(self, path: Path) -> Decoded:
        values = read_label_file(path)
        if values.ndim != 2:
            raise BadFile(path, f"is a {values.shape[2]}-channel colour image, but a single-channel index map "
                                f"was expected ({self.expected})")
        return Decoded(values)


class Source:
    """A release layout. Subclasses set the class attributes and implement `discover`.

    A subclass is also its `hiposeg prepare NAME` sub-command: its own docstring is the command's
    help (the expected layout), `flags` its options after RAW, in the order `--help` lists them
    (flags with `target="source"` are passed to the subclass's constructor)."""

    name: ClassVar[str]  # converter name (CLI command, manifest "source")
    default_hierarchy: ClassVar[str]  # built-in hierarchy name
    release_hierarchies: ClassVar[tuple[str, ...]] = ()  # those of other releases it reads (see `hierarchy_for`)
    splits: ClassVar[tuple[str, ...]] = ("train", "val")  # output splits a full release has
    label_expected: ClassVar[str] = "one-channel PNG of label ids"
    flags: ClassVar[tuple[Flag, ...]] = COMMON_FLAGS

    def discover(self, raw: Path) -> Discovery:
        raise NotImplementedError

    def hierarchy_for(self, raw: Path) -> str:
        """The built-in hierarchy of the release at `raw` (a source that reads several releases tells
        them apart by their layout)."""
        return self.default_hierarchy

    def check(self, raw: Path, hierarchy: Hierarchy) -> None:
        """Source-specific consistency checks between RAW and the hierarchy (e.g. a config)."""

    def options(self) -> dict[str, Any]:
        """Source-specific options recorded in the manifest (they must match on resume)."""
        return {}

    def reader(self, hierarchy: Hierarchy) -> Callable[[Path], Decoded]:
        return IndexLabelReader(self.label_expected)

    def command(self, raw: Path | str, out: Path | str) -> str:
        return f"hiposeg prepare {self.name} {raw} --out {out}"

    def default_out(self, raw: Path) -> Path:
        """--out when it is not given: data/NAME, where `train --dataset NAME` looks."""
        return Path("data") / self.name
