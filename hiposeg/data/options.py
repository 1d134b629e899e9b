"""The flags of the `hiposeg prepare SOURCE` sub-commands, declared as data.

Why here and not in the CLI: each source declares its own flags (`Source.flags`), so adding a
converter, or a flag to one, touches only the converter's module; `hiposeg.cli.prepare` turns these
declarations into Typer options without knowing any source. The flags every converter shares are
defined once below.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional


class UnknownPolicy(str, Enum):
    """What to do with raw label values the hierarchy does not list."""

    error = "error"
    ignore = "ignore"


@dataclass(frozen=True)
class Flag:
    """One option of a `hiposeg prepare` sub-command. Its value is passed by `name` to `prepare()`
    (`target="prepare"`: the driver's options, recorded in the manifest) or to the source's
    constructor (`target="source"`: layout choices such as PASCAL-Part's folders)."""

    name: str  # the keyword it is passed as
    type: Any  # the value's type; Optional[...] when the flag may be left out
    help: str
    default: Any = None
    decls: tuple[str, ...] = ()  # e.g. ("--quiet", "-q"); () = Typer's `--name-with-dashes`
    min: int | None = None
    required: bool = False
    show_default: bool = True
    target: Literal["prepare", "source"] = "source"


def _driver(name: str, type_: Any, decls: tuple[str, ...], help: str, **kw: Any) -> Flag:
    return Flag(name, type_, help, decls=decls, target="prepare", **kw)


OUT = _driver("out", Optional[Path], ("--out",), "Prepared dataset folder (default: data/DATASET).")
HIERARCHY = _driver("hierarchy", Optional[str], ("--hierarchy",),
                    "Hierarchy JSON file or built-in name (default: the release's built-in one).")
WORKERS = _driver("workers", Optional[int], ("--workers",), "Worker processes (default: all cores; 1 = in-process).",
                  min=1)
LIMIT = _driver("limit", Optional[int], ("--limit",), "Only the first N pairs of each split (a quick look).", min=1)
COPY = _driver("copy", bool, ("--copy",), "Copy images instead of symlinking them to RAW.", default=False)
OVERWRITE = _driver("overwrite", bool, ("--overwrite",), "Redo everything (default: resume, skipping finished files).",
                    default=False)
UNKNOWN = _driver("unknown", UnknownPolicy, ("--unknown",),
                  "Raw label values the hierarchy does not list: stop with an error, or map them to ignore (counted "
                  "in manifest.json).", default="error")
SKIP_BAD = _driver("skip_bad", bool, ("--skip-bad",),
                   "Skip unreadable, truncated, mismatched or unpaired files (listed in manifest.json) instead of "
                   "stopping.", default=False)
QUIET = _driver("quiet", bool, ("--quiet", "-q"), "No progress bar.", default=False)

# The flags of a release converter, in the order `--help` lists them (after RAW).
COMMON_FLAGS: tuple[Flag, ...] = (OUT, HIERARCHY, WORKERS, LIMIT, COPY, OVERWRITE, UNKNOWN, SKIP_BAD, QUIET)
