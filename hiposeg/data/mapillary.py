"""Mapillary Vistas 2.0 (124 classes) or 1.2 (66 classes) -> prepared dataset.

Layout of the official download (mmsegmentation dataset docs; LogicSeg `mapillary_v2.py`; datumaro's
Mapillary Vistas format), VERSION being v2.0 or v1.2:

    RAW/config_v2.0.json, RAW/config_v1.2.json
    RAW/{training,validation}/images/{key}.jpg
    RAW/{training,validation}/VERSION/labels/{key}.png

The v2.0 download holds both versions; a v1.2 download only v1.2/labels and config_v1.2.json. The
release is detected from the layout (v2.0 when its labels or config are there, else v1.2 when its
are), or chosen with `--release`; its built-in hierarchy is `mapillary_v2` or `mapillary_v1.2`.

Labels are 8-bit *palette* PNGs in both versions: the pixel's palette index is the class id (in the
order of the version's config), and the palette colours are only for display. OpenCV decodes palette
PNGs to RGB, so they are read through `decode_label_png`, which returns the indices. The config's
label names and order must match the hierarchy's leaf classes (by raw value): a mismatch is an error
instead of a silently wrong mapping. Output splits are `train` and `val`; stems are the image keys.
`--ignore-unevaluated` maps the classes the benchmark does not score (`"evaluate": false`) to ignore.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from hiposeg.data.codecs import BadFile, read_regular_bytes
from hiposeg.data.options import COMMON_FLAGS, Flag
from hiposeg.data.sources import (Decoded, Discovery, IndexLabelReader, Source, check_dir, describe_dir, list_files,
                                  partner_in)
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.safeload import load_json

RELEASE_SPLITS = {"train": "training", "val": "validation"}


@dataclass(frozen=True)
class Release:
    """One version of the Vistas download: its label folder, config file and built-in hierarchy."""

    version: str
    classes: int
    hierarchy: str

    @property
    def config(self) -> str:
        return f"config_{self.version}.json"

    @property
    def expected(self) -> str:
        return (f"RAW/{self.config}, RAW/{{training,validation}}/images/*.jpg and "
                f"RAW/{{training,validation}}/{self.version}/labels/*.png")

    def found_in(self, raw: Path) -> bool:
        """Whether RAW holds this version's config or labels."""
        return (raw / self.config).is_file() or any((raw / split / self.version / "labels").is_dir()
                                                    for split in RELEASE_SPLITS.values())


RELEASES = {r.version: r for r in (Release("v2.0", 124, "mapillary_v2"), Release("v1.2", 66, "mapillary_v1.2"))}


def detect_release(raw: Path) -> Release:
    """v2.0 when RAW holds its config or labels (the v2.0 download holds both versions), else v1.2
    when it holds v1.2's, else v2.0 (whose layout the messages then describe)."""
    v2, v1 = RELEASES["v2.0"], RELEASES["v1.2"]
    return v1 if not v2.found_in(raw) and v1.found_in(raw) else v2


class Mapillary(Source):
    """Mapillary Vistas 2.0 (124 classes) or 1.2 (66 classes).

    Expected layout (VERSION: v2.0 or v1.2):

      RAW/config_VERSION.json
      RAW/{training,validation}/images/KEY.jpg
      RAW/{training,validation}/VERSION/labels/KEY.png

    The version is detected: v2.0 when RAW has its labels or config (the
    v2.0 download holds both), else v1.2; --release chooses. Hierarchy:
    mapillary_v2 or mapillary_v1.2. Labels are palette PNGs whose palette
    index is the class id (read as indices, never as colours). The config's
    label names and order must match the hierarchy. Output splits: train, val.
    """

    name: ClassVar[str] = "mapillary"
    default_hierarchy: ClassVar[str] = "mapillary_v2"
    release_hierarchies: ClassVar[tuple[str, ...]] = ("mapillary_v1.2",)
    flags: ClassVar[tuple[Flag, ...]] = (
        *COMMON_FLAGS,
        Flag("ignore_unevaluated", bool, 'Map the classes the benchmark does not score ("evaluate": false) to ignore.',
             default=False, decls=("--ignore-unevaluated",), target="prepare"),
        Flag("release", Optional[str], "v2.0 or v1.2 (default: detected from RAW's layout; v2.0 when it has both).",
             decls=("--release",)))

    def __init__(self, release: str | None = None) -> None:
        if release is not None and release not in RELEASES:
            raise UserError(f"--release {release!r} is not a Mapillary Vistas version hiposeg reads",
                            hint=f"Use one of {', '.join(RELEASES)}.")
        self.chosen: Release | None = RELEASES[release] if release else None
        self.notes: list[str] = []

    def release(self, raw: Path) -> Release:
        """The version to prepare: --release, else detected (once) from RAW."""
        if self.chosen is None:
            self.chosen = detect_release(raw)
            if all(r.found_in(raw) for r in RELEASES.values()):
                self.notes.append(f"RAW holds Vistas v1.2 and v2.0: preparing {self.chosen.version} "
                                  "(--release v1.2 prepares the other)")
        return self.chosen

    def hierarchy_for(self, raw: Path) -> str:
        return self.release(raw).hierarchy

    def options(self) -> dict[str, Any]:
        return {"release": self.chosen.version} if self.chosen else {}

    def reader(self, hierarchy: Hierarchy) -> Callable[[Path], Decoded]:
        version = self.chosen.version if self.chosen else "VERSION"
        return IndexLabelReader(f"Mapillary {version}/labels: 8-bit palette PNG whose indices are the class ids")

    def check(self, raw: Path, hierarchy: Hierarchy) -> None:
        release = self.release(raw)
        path = raw / release.config
        if not path.exists():
            raise UserError(f"{path} not found: hiposeg checks the release's label order against the hierarchy",
                            hint=f"Expected {release.expected}; it ships at the root of the Mapillary Vistas "
                                 f"{release.version} download. Found in {raw}: {describe_dir(raw)}.")
        try:
            data = load_json(read_regular_bytes(path), str(path), hint="Restore the file from the download.")
            entries = [(str(x["name"]), str(x.get("readable", ""))) for x in data["labels"]]
        except (OSError, BadFile, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is not a Mapillary config (a JSON object with a 'labels' list of "
                            f"{{name, readable, color, ...}}): {e}", hint="Restore the file from the download.") from None
        check_config_matches(path, entries, hierarchy, release)

    def discover(self, raw: Path) -> Discovery:
        release = self.release(raw)
        found = Discovery(items={}, notes=list(self.notes))
        for split, folder in RELEASE_SPLITS.items():
            img_dir, lbl_dir = raw / folder / "images", raw / folder / release.version / "labels"
            if not check_dir(raw / folder, folder):
                found.missing_splits.append(split)
                continue
            has_i, has_l = check_dir(img_dir, f"{folder}/images"), check_dir(lbl_dir, f"{folder}/{release.version}/labels")
            if not has_i or not has_l:
                raise UserError(f"{img_dir if not has_i else lbl_dir} is missing",
                                hint=f"Expected {release.expected}; found in {raw / folder}: "
                                     f"{describe_dir(raw / folder)}.{other_release_hint(raw, release)}")
            images = list_files(img_dir, [".jpg", ".jpeg", ".png"])
            labels = list_files(lbl_dir, [".png"])
            found.add_split(split, images, labels, partner_in(lbl_dir, ".png"), partner_in(img_dir, ".jpg"))
        if not found.items:
            raise UserError(f"no Mapillary Vistas split in {raw}: expected {release.expected}; found: {describe_dir(raw)}",
                            hint=f"RAW is the folder that contains training/, validation/ and {release.config}.")
        return found


def other_release_hint(raw: Path, release: Release) -> str:
    """' Add --release v1.2 ...' when RAW holds the labels of the version not being prepared."""
    other = next(r for r in RELEASES.values() if r is not release)
    return f" RAW holds {other.version} labels: add --release {other.version} to prepare those." \
        if other.found_in(raw) else ""


def check_config_matches(path: Path, entries: list[tuple[str, str]], hierarchy: Hierarchy, release: Release) -> None:
    """Label i of the config must be the hierarchy's leaf for raw value i (by name or readable name)."""
    leaves = hierarchy.classes(hierarchy.level_names[0])
    raw_to_leaf = hierarchy.raw_to_leaf()
    problems: list[str] = []
    for i, (name, readable) in enumerate(entries):
        if i in hierarchy.raw_ignore:
            continue
        leaf = raw_to_leaf.get(i)
        if leaf is None:
            problems.append(f"label {i} {name!r} has no class in the hierarchy")
        elif leaves[leaf].name.lower() not in (name.lower(), readable.lower()):
            problems.append(f"label {i} is {name!r} in the config but {leaves[leaf].name!r} in the hierarchy")
    extra = sorted(r for r in raw_to_leaf if r >= len(entries))
    if extra:
        problems.append(f"the hierarchy maps raw values {extra[:8]} that the config ({len(entries)} labels) does not have")
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise UserError(f"{path} does not match hierarchy {hierarchy.name!r} ({len(entries)} config labels, "
                        f"{len(raw_to_leaf)} mapped raw values):\n{shown}{more}",
                        hint="Label ids are positions in this config, so a different order would silently mislabel "
                             f"pixels. Use the config of the Vistas {release.version} release ({release.classes} "
                             f"labels, hierarchy {release.hierarchy}), or a hierarchy (--hierarchy FILE) written for "
                             "this config.")
