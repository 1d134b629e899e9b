"""Label hierarchies: load and validate `hierarchies/*.json`, and expose the look-up tables.

A hierarchy is a tree of classes of any depth >= 2, written leaves first. The rest of hiposeg
needs only what this module derives from it:

* names and display colours of the classes of every level;
* the raw -> leaf LUT that `prepare` applies to a release's label PNGs (unknown raw values are
  an error unless asked otherwise; listed raw values mean "ignore");
* the ancestor LUT pi: (level A ids) -> (level B ids) for any B above A (paper eq. 2);
* the two training levels ("fine" and "coarse"; default: the leaves and their parents);
* the ignore value of prepared label maps (255, or 65535 when a level has more than 255 classes).

The file format and its validation are in `hierarchy_spec.py` (README.md, "Hierarchy files").
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from hiposeg.errors import UserError
from hiposeg.hierarchy_spec import MAX_RAW_VALUE, HierarchySpec, TrainLevels, format_validation_error, spec_problems
from hiposeg.safeload import load_json


@dataclass(frozen=True)
class ClassInfo:
    """One class of one level, as the rest of hiposeg sees it."""

    id: int
    name: str
    color: tuple[int, int, int]
    parent: int | None  # id in the next level up, None at the top level
    evaluate: bool


class Hierarchy:
    """A validated label hierarchy. Build with `Hierarchy.load(name_or_path)`."""

    def __init__(self, spec: HierarchySpec, path: Path | None = None) -> None:
        self.spec = spec
        self.path = path
        problems = spec_problems(spec)
        if problems:
            raise UserError(
                f"invalid hierarchy {self._label}:\n" + "\n".join(f"  - {p}" for p in problems),
                hint="Fix the file and run `hiposeg hierarchy validate FILE` (format: README.md, 'Hierarchy files').",
            )
        self._levels: list[list[ClassInfo]] = []
        for li, lvl in enumerate(spec.levels):
            up = {c.name: c.id for c in spec.levels[li + 1].classes} if li + 1 < len(spec.levels) else {}
            infos = sorted(
                (ClassInfo(c.id, c.name, tuple(c.color), up[c.parent] if c.parent else None, c.evaluate) for c in lvl.classes),
                key=lambda c: c.id,
            )
            self._levels.append(infos)
        train = spec.train or TrainLevels(fine=spec.levels[0].name, coarse=spec.levels[1].name)
        self.fine_level: str = train.fine
        self.coarse_level: str = train.coarse

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, path: Path | None = None) -> Hierarchy:
        label = str(path) if path else "(in memory)"
        try:
            spec = HierarchySpec.model_validate(data)
        except ValidationError as e:
            raise UserError(f"invalid hierarchy {label}:\n{format_validation_error(e, data)}",
                            hint="Fix the file and run `hiposeg hierarchy validate FILE` (format: README.md, 'Hierarchy files').") from None
        return cls(spec, path)

    @classmethod
    def from_file(cls, path: str | Path, *, allow_pipe: bool = False) -> Hierarchy:
        """Read a hierarchy JSON file. A pipe is read only with `allow_pipe`, for a file the user names
        on the command line (`--hierarchy <(...)`, `hierarchy validate /dev/stdin`); anywhere else (a
        prepared dataset's hierarchy.json) a FIFO would block the run forever, so it is refused."""
        path = Path(path)
        try:
            text = read_hierarchy_text(path, allow_pipe)
        except FileNotFoundError:
            raise UserError(f"hierarchy file not found: {path}",
                            hint=f"Give a path to a JSON file or one of the built-in names: {', '.join(builtin_names())}.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read hierarchy file {path}: {e}") from None
        data = load_json(text, f"hierarchy file {path}",
                         hint="Fix the JSON syntax at that position (a trailing comma or a missing quote is the usual "
                              "cause).")
        return cls.from_dict(data, path)

    @classmethod
    def load(cls, name_or_path: str | Path) -> Hierarchy:
        """A built-in name (`cityscapes`, `ade20k`, ...) or a path to a JSON file, named by the user
        (so it may be a pipe)."""
        s = str(name_or_path)
        if s in builtin_names():
            return cls.from_file(builtin_dir() / f"{s}.json")
        p = Path(s)
        if p.suffix.lower() != ".json" and not p.exists():
            raise UserError(f"unknown hierarchy {s!r}",
                            hint=f"Use a built-in name ({', '.join(builtin_names())}) or a path to a .json file.")
        return cls.from_file(p, allow_pipe=True)

    # ---- basic properties ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def title(self) -> str:
        return self.spec.title or self.spec.name

    @property
    def source(self) -> str:
        return self.spec.source

    @property
    def _label(self) -> str:
        return str(self.path) if self.path else repr(self.spec.name)

    @property
    def level_names(self) -> list[str]:
        """Level names, leaves first."""
        return [lvl.name for lvl in self.spec.levels]

    @property
    def depth(self) -> int:
        return len(self.spec.levels)

    def level_index(self, level: str) -> int:
        try:
            return self.level_names.index(level)
        except ValueError:
            raise UserError(f"hierarchy {self.name!r} has no level {level!r}",
                            hint=f"Its levels are: {', '.join(self.level_names)}.") from None

    def classes(self, level: str) -> list[ClassInfo]:
        return self._levels[self.level_index(level)]

    def num_classes(self, level: str) -> int:
        return len(self.classes(level))

    def names(self, level: str) -> list[str]:
        return [c.name for c in self.classes(level)]

    def colors(self, level: str) -> np.ndarray:
        """(K, 3) uint8 RGB palette of a level."""
        return np.array([c.color for c in self.classes(level)], dtype=np.uint8).reshape(-1, 3)

    @property
    def num_fine(self) -> int:
        return self.num_classes(self.fine_level)

    @property
    def num_coarse(self) -> int:
        return self.num_classes(self.coarse_level)

    @property
    def ignore_index(self) -> int:
        """Value of 'ignore' in prepared label maps: 255 (8-bit maps), or 65535 (16-bit maps)."""
        return 255 if max(len(lvl) for lvl in self._levels) <= 255 else 65535

    @property
    def label_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.ignore_index == 255 else np.dtype(np.uint16)

    @property
    def levels_above_fine(self) -> list[str]:
        """The training fine level and every level above it (these can be evaluated)."""
        return self.level_names[self.level_index(self.fine_level):]

    # ---- look-up tables -------------------------------------------------------------------

    def ancestor_lut(self, from_level: str, to_level: str) -> np.ndarray:
        """pi as an int64 array: entry i is the `to_level` ancestor of class i of `from_level`."""
        a, b = self.level_index(from_level), self.level_index(to_level)
        if b < a:
            raise UserError(f"level {to_level!r} is below {from_level!r} in hierarchy {self.name!r}; "
                            "an ancestor map goes upwards (leaves first: " + ", ".join(self.level_names) + ")")
        lut = np.arange(len(self._levels[a]), dtype=np.int64)
        for li in range(a, b):
            parents = np.array([c.parent for c in self._levels[li]], dtype=np.int64)
            lut = parents[lut]
        return lut

    @cached_property
    def fine_to_coarse(self) -> np.ndarray:
        """pi of paper eq. (2): fine (low-level) id -> coarse (high-level) id."""
        return self.ancestor_lut(self.fine_level, self.coarse_level)

    def children(self, level: str) -> dict[int, list[int]]:
        """Class id of `level` -> ids of its children one level down."""
        li = self.level_index(level)
        if li == 0:
            return {c.id: [] for c in self._levels[0]}
        out: dict[int, list[int]] = {c.id: [] for c in self._levels[li]}
        for c in self._levels[li - 1]:
            out[c.parent].append(c.id)  # type: ignore[index]
        return out

    @property
    def raw_ignore(self) -> list[int]:
        return sorted(set(self.spec.raw.ignore))

    @property
    def has_raw_mapping(self) -> bool:
        return self.spec.levels[0].classes[0].raw is not None

    def raw_to_leaf(self) -> dict[int, int]:
        """Raw label value -> leaf id (identity when the file lists no `raw` values)."""
        leaves = self.spec.levels[0].classes
        if self.has_raw_mapping:
            return {r: c.id for c in leaves for r in (c.raw or [])}
        return {c.id: c.id for c in leaves}

    def raw_lut(self, level: str | None = None, *, unknown: Literal["error", "ignore"] = "error") -> np.ndarray:
        """LUT of size 65536 (int32): raw value -> class id of `level` (default: the fine level).

        Ignore values map to `ignore_index`. Raw values the hierarchy does not know map to -1 with
        `unknown="error"` (callers report them) or to `ignore_index` with `unknown="ignore"`.
        """
        level = level or self.fine_level
        to_level = self.ancestor_lut(self.level_names[0], level)
        lut = np.full(MAX_RAW_VALUE + 1, -1 if unknown == "error" else self.ignore_index, dtype=np.int32)
        for r in self.raw_ignore:
            lut[r] = self.ignore_index
        for r, leaf in self.raw_to_leaf().items():
            lut[r] = to_level[leaf]
        return lut

    def known_raw_values(self) -> set[int]:
        return set(self.raw_to_leaf()) | set(self.raw_ignore)

    # ---- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The normalised form: every default filled in, classes sorted by id, raw value lists sorted."""
        d = self.spec.model_dump(mode="json", exclude_none=True)
        for lvl in d["levels"]:
            lvl["classes"].sort(key=lambda c: c["id"])
            for c in lvl["classes"]:
                if "raw" in c:
                    c["raw"] = sorted(c["raw"])
        d["raw"]["ignore"] = self.raw_ignore  # sorted, duplicates dropped: they mean the same
        d["train"] = {"fine": self.fine_level, "coarse": self.coarse_level}
        return d

    @cached_property
    def sha256(self) -> str:
        """Digest of what the hierarchy *means*: the tree, class names and ids, the raw mapping,
        evaluation flags and training levels. Order, colours and prose (title, source,
        description) are left out, so editing them does not orphan checkpoints or prepared data."""
        d = self.to_dict()
        meaning = {
            "levels": [{"name": lvl["name"],
                        "classes": [{k: c[k] for k in ("id", "name", "parent", "raw", "evaluate") if k in c}
                                    for c in lvl["classes"]]} for lvl in d["levels"]],
            "train": d["train"],
            "raw_ignore": d.get("raw", {}).get("ignore", []),
        }
        blob = json.dumps(meaning, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def summary(self) -> str:
        return " -> ".join(f"{self.num_classes(n)} {n}" for n in self.level_names)

    def __repr__(self) -> str:
        return f"Hierarchy({self.name!r}: {self.summary()}; train fine={self.fine_level!r}, coarse={self.coarse_level!r})"


def read_hierarchy_text(path: Path, allow_pipe: bool) -> str:
    """The text of a hierarchy file: a regular file, or with `allow_pipe` a pipe; a folder, device,
    socket (or an unwanted pipe) is refused before reading (a device such as /dev/zero would be read
    forever, a FIFO without a writer waited on forever)."""
    from hiposeg.data.codecs import BadFile, not_regular, read_regular_bytes

    hint = ("Give the path of a hierarchy JSON file (a pipe is read only as a file named on the command line, "
            "e.g. --hierarchy <(...)); in a prepared dataset, prepare it again.")
    mode = os.stat(path).st_mode
    if allow_pipe and stat.S_ISFIFO(mode):
        return path.read_text(encoding="utf-8")
    kind = not_regular(mode)
    if kind is not None:
        raise UserError(f"hierarchy file {path} is {kind}, not a regular file", hint=hint)
    try:
        return read_regular_bytes(path).decode("utf-8")
    except BadFile as e:  # swapped for a FIFO or device since the stat
        raise UserError(f"hierarchy file {e}", hint=hint) from None


# --------------------------------------------------------------------------------------------
# Built-in hierarchy files.
# --------------------------------------------------------------------------------------------


def builtin_dir() -> Path:
    """`hierarchies/` of a source checkout, or its copy inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_hierarchies", here.parent / "hierarchies"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("hiposeg's built-in hierarchies/ folder is missing from this installation")


def builtin_names() -> list[str]:
    """The names `Hierarchy.load` accepts instead of a path (the files of `builtin_dir`)."""
    try:
        return sorted(p.stem for p in builtin_dir().glob("*.json"))
    except FileNotFoundError:
        return []
