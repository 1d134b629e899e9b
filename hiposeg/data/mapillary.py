"""Mapillary Vistas 2.0 -> prepared dataset.

Layout of the official download (mmsegmentation dataset docs; LogicSeg `mapillary_v2.py`):

    RAW/config_v2.0.json
    RAW/{training,validation}/images/{key}.jpg
    RAW/{training,validation}/v2.0/labels/{key}.png

Labels are 8-bit *palette* PNGs: the pixel's palette index is the class id (0..123, in the order
of `config_v2.0.json`), and the palette colours are only for display. OpenCV decodes palette PNGs
to RGB, so they are read through `decode_label_png`, which returns the indices. The config's label
names and order must match the hierarchy's leaf classes (by raw value): a mismatch, or a v1.2 tree
(66 classes, `v1.2/labels`), is an error instead of a silently wrong mapping. Output splits are
`train` and `val`; stems are the image keys. `--ignore-unevaluated` maps the classes the benchmark
does not score (`"evaluate": false`: ambiguous/group/unlabeled) to ignore.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from hiposeg.data.codecs import BadFile, read_regular_bytes
from hiposeg.data.options import COMMON_FLAGS, Flag
from hiposeg.data.sources import Discovery, Source, check_dir, describe_dir, list_files, partner_in
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.safeload import load_json

RELEASE_SPLITS = {"train": "training", "val": "validation"}
CONFIG = "config_v2.0.json"
EXPECTED = (f"RAW/{CONFIG}, RAW/{{training,validation}}/images/*.jpg and "
            "RAW/{training,validation}/v2.0/labels/*.png")


class Mapillary(Source):
    """Mapillary Vistas 2.0 (124 classes).

    Expected layout:

      RAW/config_v2.0.json
      RAW/{training,validation}/images/KEY.jpg
      RAW/{training,validation}/v2.0/labels/KEY.png

    Labels are palette PNGs whose palette index is the class id (read as
    indices, never as colours). The config's label names and order must match
    the hierarchy. Output splits: train, val.
    """

    name: ClassVar[str] = "mapillary"
    default_hierarchy: ClassVar[str] = "mapillary_v2"
    label_expected: ClassVar[str] = "Mapillary v2.0/labels: 8-bit palette PNG whose indices are the class ids"
    flags: ClassVar[tuple[Flag, ...]] = (*COMMON_FLAGS, Flag(
        "ignore_unevaluated", bool, 'Map the classes the benchmark does not score ("evaluate": false) to ignore.',
        default=False, decls=("--ignore-unevaluated",), target="prepare"))

    def check(self, raw: Path, hierarchy: Hierarchy) -> None:
        self._reject_v12(raw)
        path = raw / CONFIG
        if not path.exists():
            raise UserError(f"{path} not found: hiposeg checks the release's label order against the hierarchy",
                            hint=f"Expected {EXPECTED}; it ships at the root of the Mapillary Vistas 2.0 download. "
                                 f"Found in {raw}: {describe_dir(raw)}.")
        try:
            data = load_json(read_regular_bytes(path), str(path), hint="Restore the file from the download.")
            entries = [(str(x["name"]), str(x.get("readable", ""))) for x in data["labels"]]
        except (OSError, BadFile, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is not a Mapillary config (a JSON object with a 'labels' list of "
                            f"{{name, readable, color, ...}}): {e}", hint="Restore the file from the download.") from None
        check_config_matches(path, entries, hierarchy)

    def _reject_v12(self, raw: Path) -> None:
        for release in RELEASE_SPLITS.values():
            if (raw / release / "v1.2").is_dir() and not (raw / release / "v2.0").is_dir():
                raise UserError(f"{raw / release} holds a Mapillary Vistas v1.2 tree (v1.2/labels, 66 classes) but no "
                                "v2.0/labels; the mapillary_v2 hierarchy describes the 124 v2.0 classes",
                                hint="Use the Vistas 2.0 download (it contains both versions), or write a hierarchy "
                                     "for v1.2 and prepare with `hiposeg prepare folder`.")
        if (raw / "config_v1.2.json").is_file() and not (raw / CONFIG).is_file():
            raise UserError(f"{raw} has config_v1.2.json but no {CONFIG}: this is a Mapillary Vistas v1.2 release",
                            hint="Use the Vistas 2.0 download (it contains both versions).")

    def discover(self, raw: Path) -> Discovery:
        found = Discovery(items={})
        for split, release in RELEASE_SPLITS.items():
            img_dir, lbl_dir = raw / release / "images", raw / release / "v2.0" / "labels"
            if not check_dir(raw / release, release):
                found.missing_splits.append(split)
                continue
            has_i, has_l = check_dir(img_dir, f"{release}/images"), check_dir(lbl_dir, f"{release}/v2.0/labels")
            if not has_i or not has_l:
                raise UserError(f"{img_dir if not has_i else lbl_dir} is missing", hint=f"Expected {EXPECTED}; found in "
                                f"{raw / release}: {describe_dir(raw / release)}.")
            images = list_files(img_dir, [".jpg", ".jpeg", ".png"])
            labels = list_files(lbl_dir, [".png"])
            found.add_split(split, images, labels, partner_in(lbl_dir, ".png"), partner_in(img_dir, ".jpg"))
        if not found.items:
            raise UserError(f"no Mapillary Vistas split in {raw}: expected {EXPECTED}; found: {describe_dir(raw)}",
                            hint="RAW is the folder that contains training/, validation/ and config_v2.0.json.")
        return found


def check_config_matches(path: Path, entries: list[tuple[str, str]], hierarchy: Hierarchy) -> None:
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
                             "pixels. Use the config of the Vistas 2.0 release, or a hierarchy (--hierarchy FILE) "
                             "written for this config.")

