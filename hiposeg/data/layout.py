"""Where a prepared dataset keeps its files (README "Preparing data"), and which names may become paths.

    DATA/manifest.json  DATA/hierarchy.json  DATA/.prepare-journal.jsonl
    DATA/{split}/{images,fine,coarse}/{stem}.{ext}

Why a module of its own: the converters, the synthetic set, the output-folder rules and the training
loader all name these paths, and a split or stem read from a RAW layout, a manifest or a journal
becomes one. A name that is not plain (`../x`, `/x`) could reach outside --out, so every such name
is checked here before it is joined to a path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hiposeg.atomic import NAME_MAX, TEMP_NAME_EXTRA
from hiposeg.errors import UserError
from hiposeg.lock import LOCK_NAME

JOURNAL_NAME = ".prepare-journal.jsonl"
MANIFEST_NAME = "manifest.json"
HIERARCHY_NAME = "hierarchy.json"
LEVEL_DIRS = ("images", "fine", "coarse")
TOP_LEVEL_FILES = (MANIFEST_NAME, HIERARCHY_NAME, JOURNAL_NAME, LOCK_NAME)  # beside the split folders


def is_plain_name(name: Any) -> bool:
    """A non-empty string naming one entry of a folder: no path separator or NUL, not `.` or `..`
    (which also rules out absolute paths)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name and "/" not in name
            and (os.altsep is None or os.altsep not in name))


def plain_name(name: Any, what: str, source: str | os.PathLike, hint: str) -> str:
    """`name` if `is_plain_name`, else a UserError naming where it was read (`source`) and the fix."""
    if not is_plain_name(name):
        raise UserError(f"{source}: {what} {name!r} is not a plain folder or file name (it must not be empty, "
                        "'.' or '..', nor contain '/' or NUL)", hint=hint)
    return name


def check_split_name(split: str, source: str | os.PathLike, hint: str) -> None:
    """A split folder sits beside the dataset's own files: one named like them could never be written."""
    if split in TOP_LEVEL_FILES:
        raise UserError(f"{source}: split {split!r} has the name of a file hiposeg keeps beside the split folders "
                        f"of a prepared dataset ({', '.join(TOP_LEVEL_FILES)}), so it can never be prepared",
                        hint=hint)


def check_output_name(name: str, source: str | os.PathLike, what: str) -> None:
    """An output file `name` made from an input's (`source`) name must fit NAME_MAX bytes together with
    its temp-name overhead, else the write fails late with "File name too long"; checked before the work."""
    size = len(os.fsencode(name))
    if size + TEMP_NAME_EXTRA > NAME_MAX:
        keep = NAME_MAX - TEMP_NAME_EXTRA - (size - len(os.fsencode(os.path.splitext(name)[0])))
        raise UserError(f"{what} {source}: its output file {name[:24]}...{name[-12:]} would be {size} bytes long, and "
                        f"hiposeg writes it through a temp name {TEMP_NAME_EXTRA} bytes longer, beyond the "
                        f"{NAME_MAX}-byte limit of a file name",
                        hint=f"Rename the file: a name (without its extension) of at most {keep} bytes.")


def folder_inside(root: Path, folder: Path) -> bool:
    """Whether `folder` is, after resolving symlinks, `root` or below it. A file in it can be removed
    without touching anything outside `root` (unlinking a symlink removes the link only)."""
    real_root, real = os.path.realpath(root), os.path.realpath(folder)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def output_paths(out: Path, split: str, stem: str, image_suffix: str) -> dict[str, Path]:
    """The three files of one prepared item: its image, fine and coarse label maps."""
    return {"images": out / split / "images" / f"{stem}{image_suffix}",
            "fine": out / split / "fine" / f"{stem}.png",
            "coarse": out / split / "coarse" / f"{stem}.png"}


def split_dirs(out: Path, splits: Iterable[str]) -> list[Path]:
    """The images/fine/coarse folders of `splits`."""
    return [out / s / d for s in splits for d in LEVEL_DIRS]
