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

from hiposeg.errors import UserError

JOURNAL_NAME = ".prepare-journal.jsonl"
MANIFEST_NAME = "manifest.json"
HIERARCHY_NAME = "hierarchy.json"
LEVEL_DIRS = ("images", "fine", "coarse")


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
