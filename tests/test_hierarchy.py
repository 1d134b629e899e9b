"""Hierarchy files: the shipped ones against their published sources, the validator's messages, the
look-up tables and the `hiposeg hierarchy` commands.

Expected values are typed in here from the public sources (cityscapesScripts labels.py, LogicSeg's
`hiera` ranges, GMNet's part ranges, mmsegmentation's ADE20K palette), not derived from the files
under test.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

import hiposeg
from conftest import real_sample, squash
from hiposeg.cli import app
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy, builtin_dir, builtin_names

SHIPPED = {"cityscapes", "ade20k", "mapillary_v2", "mapillary_v1.2", "pascal_part_108"}


def flat(text: str) -> str:
    """Rich wraps console output at the terminal width; compare with whitespace collapsed."""
    return " ".join(text.split())


# ============================================================================================
# Every shipped file validates, with the published class counts.
# ============================================================================================

EXPECTED_COUNTS = {
    "cityscapes": [19, 7],
    "ade20k": [150, 14, 3],
    "mapillary_v2": [124, 17, 7],
    "mapillary_v1.2": [66, 14, 7],
    "pascal_part_108": [108, 21],
}


def test_expected_builtins_are_shipped():
    assert SHIPPED <= set(builtin_names())


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_validates(name):
    h = Hierarchy.load(name)
    assert h.name == name
    assert h.source.strip()
    if name in EXPECTED_COUNTS:
        assert [h.num_classes(lvl) for lvl in h.level_names] == EXPECTED_COUNTS[name]
        # the paper trains on the leaves and the level above them
        assert (h.fine_level, h.coarse_level) == (h.level_names[0], h.level_names[1])
        assert h.ignore_index == 255 and h.label_dtype == np.uint8
    for lvl in h.level_names:
        assert h.colors(lvl).shape == (h.num_classes(lvl), 3)
    # every group level has distinct display colours (leaf palettes are the releases' own)
    for lvl in h.level_names[1:]:
        assert len({tuple(c) for c in h.colors(lvl).tolist()}) == h.num_classes(lvl), lvl


# ============================================================================================
# Cityscapes: raw labelIds -> trainId -> category, from the published labels.py table.
# ============================================================================================

# mcordts/cityscapesScripts cityscapesscripts/helpers/labels.py: (name, id, trainId, category, categoryId)
CITYSCAPES_LABELS = [
    ("unlabeled", 0, 255, "void", 0),
    ("ego vehicle", 1, 255, "void", 0),
    ("rectification border", 2, 255, "void", 0),
    ("out of roi", 3, 255, "void", 0),
    ("static", 4, 255, "void", 0),
    ("dynamic", 5, 255, "void", 0),
    ("ground", 6, 255, "void", 0),
    ("road", 7, 0, "flat", 1),
    ("sidewalk", 8, 1, "flat", 1),
    ("parking", 9, 255, "flat", 1),
    ("rail track", 10, 255, "flat", 1),
    ("building", 11, 2, "construction", 2),
    ("wall", 12, 3, "construction", 2),
    ("fence", 13, 4, "construction", 2),
    ("guard rail", 14, 255, "construction", 2),
    ("bridge", 15, 255, "construction", 2),
    ("tunnel", 16, 255, "construction", 2),
    ("pole", 17, 5, "object", 3),
    ("polegroup", 18, 255, "object", 3),
    ("traffic light", 19, 6, "object", 3),
    ("traffic sign", 20, 7, "object", 3),
    ("vegetation", 21, 8, "nature", 4),
    ("terrain", 22, 9, "nature", 4),
    ("sky", 23, 10, "sky", 5),
    ("person", 24, 11, "human", 6),
    ("rider", 25, 12, "human", 6),
    ("car", 26, 13, "vehicle", 7),
    ("truck", 27, 14, "vehicle", 7),
    ("bus", 28, 15, "vehicle", 7),
    ("caravan", 29, 255, "vehicle", 7),
    ("trailer", 30, 255, "vehicle", 7),
    ("train", 31, 16, "vehicle", 7),
    ("motorcycle", 32, 17, "vehicle", 7),
    ("bicycle", 33, 18, "vehicle", 7),
]
CITYSCAPES_CATEGORIES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]  # categoryId 1..7


def test_cityscapes_names_follow_train_ids_and_categories():
    h = Hierarchy.load("cityscapes")
    trained = sorted((t, n) for n, _, t, _, _ in CITYSCAPES_LABELS if t != 255)
    assert h.names("class") == [n for _, n in trained]
    assert h.names("category") == CITYSCAPES_CATEGORIES


@pytest.mark.parametrize("name,raw,train_id,category,category_id", CITYSCAPES_LABELS)
def test_cityscapes_raw_to_fine_and_coarse(name, raw, train_id, category, category_id):
    h = Hierarchy.load("cityscapes")
    fine, coarse = h.raw_lut(), h.raw_lut("category")
    assert fine[raw] == train_id, name
    if train_id == 255:
        assert coarse[raw] == 255, name
    else:
        assert coarse[raw] == category_id - 1, name
        assert h.names("category")[coarse[raw]] == category
        assert h.names("class")[fine[raw]] == name


def test_cityscapes_spot_values():
    h = Hierarchy.load("cityscapes")
    fine, coarse = h.raw_lut(), h.raw_lut("category")
    assert (fine[7], coarse[7]) == (0, 0)        # road -> flat
    assert (fine[9], coarse[9]) == (255, 255)    # parking is ignored
    assert (fine[31], coarse[31]) == (16, 6)     # train -> vehicle
    assert h.fine_to_coarse.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6]  # HSSN hiera_map


@pytest.mark.parametrize("raw", [34, 200, 254, 256, 65535])
def test_unknown_raw_values(raw):
    h = Hierarchy.load("cityscapes")
    assert h.raw_lut(unknown="error")[raw] == -1
    assert h.raw_lut(unknown="ignore")[raw] == 255
    assert h.raw_lut("category", unknown="error")[raw] == -1
    assert h.raw_lut("category", unknown="ignore")[raw] == 255
    assert raw not in h.known_raw_values()


def test_raw_lut_shape_and_dtype():
    lut = Hierarchy.load("cityscapes").raw_lut()
    assert lut.shape == (65536,) and lut.dtype == np.int32


# ============================================================================================
# ADE20K
# ============================================================================================

# LogicSeg mmseg/models/losses/ade20k.py: group names (LogicSeg spells "strcuture") and sizes, in order.
ADE_GROUPS = [("flat", 9), ("structure", 16), ("barrier", 4), ("sign", 6), ("furniture", 26), ("vehicle", 10),
              ("support", 3), ("device", 23), ("container", 15), ("fabric", 7), ("other_objects", 12),
              ("living_things", 2), ("plant", 4), ("nature", 13)]
ADE_TOPS = [("Construction", 29), ("Object", 104), ("Nature", 17)]


def test_ade20k_raw_mapping_is_reduce_zero_label():
    h = Hierarchy.load("ade20k")
    lut = h.raw_lut()
    assert lut[0] == 255
    for v in range(1, 151):
        assert lut[v] == v - 1
    assert lut[151] == -1 and h.raw_lut(unknown="ignore")[151] == 255


def test_ade20k_group_sizes_and_tops():
    h = Hierarchy.load("ade20k")
    assert h.names("group") == [g for g, _ in ADE_GROUPS]
    assert np.bincount(h.fine_to_coarse, minlength=14).tolist() == [n for _, n in ADE_GROUPS]
    assert h.names("category") == [t for t, _ in ADE_TOPS]
    to_top = h.ancestor_lut("class", "category")
    assert np.bincount(to_top, minlength=3).tolist() == [n for _, n in ADE_TOPS]
    group_top = h.ancestor_lut("group", "category").tolist()
    assert group_top == [0, 0, 0] + [1] * 9 + [2, 2]  # flat..barrier / sign..living_things / plant, nature


def test_ade20k_names_and_palette():
    h = Hierarchy.load("ade20k")
    names = h.names("class")
    assert names[:5] == ["wall", "building", "sky", "floor", "tree"]
    assert names[-3:] == ["glass", "clock", "flag"]
    assert names[7] == "bed"  # mmseg writes 'bed ' with a trailing space
    colors = h.colors("class")
    # open-mmlab/mmsegmentation mmseg/datasets/ade.py ADE20KDataset palette
    assert colors[0].tolist() == [120, 120, 120]
    assert colors[1].tolist() == [180, 120, 120]
    assert colors[2].tolist() == [6, 230, 230]
    assert colors[12].tolist() == [150, 5, 61]   # person
    assert colors[149].tolist() == [92, 0, 255]  # flag
    assert "reconstruction" in h.source.lower()


def test_ade20k_obvious_memberships():
    h = Hierarchy.load("ade20k")
    group = dict(zip(h.names("class"), (h.names("group")[g] for g in h.fine_to_coarse)))
    assert group["road"] == "flat" and group["floor"] == "flat"
    assert group["building"] == "structure"
    assert group["fence"] == "barrier"
    assert group["chair"] == "furniture" and group["bed"] == "furniture"
    assert group["car"] == "vehicle" and group["bicycle"] == "vehicle"
    assert group["person"] == "living_things" and group["animal"] == "living_things"
    assert group["tree"] == "plant" and group["sky"] == "nature"


def test_ade20k_against_object_info_150():
    h = Hierarchy.load("ade20k")
    with real_sample("ade20k/objectInfo150.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["Idx"]) for r in rows] == list(range(1, 151))
    tops = h.names("category")
    to_top = h.ancestor_lut("class", "category")
    for leaf, row in enumerate(rows):
        name = h.names("class")[leaf]
        synonyms = row["Name"].split(";")
        assert all(word in synonyms for word in name.split()), (name, row["Name"])
        # the reconstruction keeps 'stuff' regions in Construction / Nature (conveyer belt is a vehicle)
        if row["Stuff"] == "1" and name != "conveyer belt":
            assert tops[to_top[leaf]] in ("Construction", "Nature"), name


# ============================================================================================
# Mapillary Vistas v2.0
# ============================================================================================

# LogicSeg mmseg/models/losses/mapillary.py `hiera`, [start, end) over config ids; id 123 falls back to void.
MAPILLARY_MID = [("animal", 0, 2), ("barrier", 2, 12), ("flat", 12, 26), ("structure", 26, 30), ("person", 30, 32),
                 ("rider", 32, 35), ("marking_continuous", 35, 38), ("marking_discrete", 38, 55),
                 ("marking_only", 55, 59), ("nature", 59, 66), ("object", 66, 78), ("sign", 78, 84),
                 ("support", 84, 90), ("traffic_light", 90, 96), ("traffic_sign", 96, 105), ("vehicle", 105, 117),
                 ("void", 117, 124)]
MAPILLARY_TOP = [("animal", 0, 2), ("construction", 2, 30), ("human", 30, 35), ("marking", 35, 59),
                 ("nature", 59, 66), ("object", 66, 117), ("void", 117, 124)]


def expand(ranges: list[tuple[str, int, int]]) -> list[int]:
    out: list[int] = []
    for k, (_, a, b) in enumerate(ranges):
        out += [k] * (b - a)
    return out


def test_mapillary_levels_are_logicseg_ranges():
    h = Hierarchy.load("mapillary_v2")
    assert h.names("group") == [n for n, _, _ in MAPILLARY_MID]
    assert h.names("category") == [n for n, _, _ in MAPILLARY_TOP]
    assert h.fine_to_coarse.tolist() == expand(MAPILLARY_MID)
    assert h.ancestor_lut("class", "category").tolist() == expand(MAPILLARY_TOP)
    assert h.raw_lut().tolist()[:124] == list(range(124))  # identity; nothing ignored by default
    assert h.raw_ignore == []
    assert h.raw_lut()[124] == -1


@pytest.mark.parametrize("leaf,group", [(12, "flat"), (84, "support"), (89, "support"), (104, "traffic_sign"),
                                        (117, "void"), (123, "void")])
def test_mapillary_logicseg_quirks(leaf, group):
    h = Hierarchy.load("mapillary_v2")
    assert h.names("group")[h.fine_to_coarse[leaf]] == group
    assert h.raw_lut("group")[leaf] == h.names("group").index(group)


def test_mapillary_not_evaluated_classes():
    h = Hierarchy.load("mapillary_v2")
    assert [c.id for c in h.classes("class") if not c.evaluate] == [2, 31, 38, 79, 86, 96, 115, 123]
    names = h.names("class")
    assert names[21] == "construction--flat--road" and names[123] == "void--unlabeled"


def test_mapillary_leaves_match_config():
    labels = json.loads(real_sample("mapillary/config_v2.0.json").read_text())["labels"]
    h = Hierarchy.load("mapillary_v2")
    assert h.names("class") == [lab["name"] for lab in labels]
    assert h.colors("class").tolist() == [lab["color"] for lab in labels]
    assert [c.evaluate for c in h.classes("class")] == [lab["evaluate"] for lab in labels]


# ============================================================================================
# Mapillary Vistas v1.2
# ============================================================================================

# The 66 v1.2 labels in config order: names from datumaro (format.py MapillaryVistasLabelMap_V12), colours
# from mmsegmentation (mapillary.py MapillaryDataset_v1 PALETTE).
MAPILLARY_V12 = [
    ("animal--bird", (165, 42, 42)), ("animal--ground-animal", (0, 192, 0)),
    ("construction--barrier--curb", (196, 196, 196)), ("construction--barrier--fence", (190, 153, 153)),
    ("construction--barrier--guard-rail", (180, 165, 180)), ("construction--barrier--other-barrier", (90, 120, 150)),
    ("construction--barrier--wall", (102, 102, 156)), ("construction--flat--bike-lane", (128, 64, 255)),
    ("construction--flat--crosswalk-plain", (140, 140, 200)), ("construction--flat--curb-cut", (170, 170, 170)),
    ("construction--flat--parking", (250, 170, 160)), ("construction--flat--pedestrian-area", (96, 96, 96)),
    ("construction--flat--rail-track", (230, 150, 140)), ("construction--flat--road", (128, 64, 128)),
    ("construction--flat--service-lane", (110, 110, 110)), ("construction--flat--sidewalk", (244, 35, 232)),
    ("construction--structure--bridge", (150, 100, 100)), ("construction--structure--building", (70, 70, 70)),
    ("construction--structure--tunnel", (150, 120, 90)), ("human--person", (220, 20, 60)),
    ("human--rider--bicyclist", (255, 0, 0)), ("human--rider--motorcyclist", (255, 0, 100)),
    ("human--rider--other-rider", (255, 0, 200)), ("marking--crosswalk-zebra", (200, 128, 128)),
    ("marking--general", (255, 255, 255)), ("nature--mountain", (64, 170, 64)), ("nature--sand", (230, 160, 50)),
    ("nature--sky", (70, 130, 180)), ("nature--snow", (190, 255, 255)), ("nature--terrain", (152, 251, 152)),
    ("nature--vegetation", (107, 142, 35)), ("nature--water", (0, 170, 30)), ("object--banner", (255, 255, 128)),
    ("object--bench", (250, 0, 30)), ("object--bike-rack", (100, 140, 180)), ("object--billboard", (220, 220, 220)),
    ("object--catch-basin", (220, 128, 128)), ("object--cctv-camera", (222, 40, 40)),
    ("object--fire-hydrant", (100, 170, 30)), ("object--junction-box", (40, 40, 40)), ("object--mailbox", (33, 33, 33)),
    ("object--manhole", (100, 128, 160)), ("object--phone-booth", (142, 0, 0)), ("object--pothole", (70, 100, 150)),
    ("object--street-light", (210, 170, 100)), ("object--support--pole", (153, 153, 153)),
    ("object--support--traffic-sign-frame", (128, 128, 128)), ("object--support--utility-pole", (0, 0, 80)),
    ("object--traffic-light", (250, 170, 30)), ("object--traffic-sign--back", (192, 192, 192)),
    ("object--traffic-sign--front", (220, 220, 0)), ("object--trash-can", (140, 140, 20)),
    ("object--vehicle--bicycle", (119, 11, 32)), ("object--vehicle--boat", (150, 0, 255)),
    ("object--vehicle--bus", (0, 60, 100)), ("object--vehicle--car", (0, 0, 142)),
    ("object--vehicle--caravan", (0, 0, 90)), ("object--vehicle--motorcycle", (0, 0, 230)),
    ("object--vehicle--on-rails", (0, 80, 100)), ("object--vehicle--other-vehicle", (128, 64, 64)),
    ("object--vehicle--trailer", (0, 0, 110)), ("object--vehicle--truck", (0, 0, 70)),
    ("object--vehicle--wheeled-slow", (0, 0, 192)), ("void--car-mount", (32, 32, 32)),
    ("void--ego-vehicle", (120, 10, 10)), ("void--unlabeled", (0, 0, 0)),
]
# The v1.2 names v2.0 does not have, and the group of their name's path in v2.0 (README, hierarchy table).
MAPILLARY_V12_ONLY = {"human--person": "person", "object--traffic-light": "traffic_light", "object--billboard": "object",
                      "marking--crosswalk-zebra": "marking", "marking--general": "marking"}


def test_mapillary_v12_leaves_are_the_v12_labels_in_config_order():
    h = Hierarchy.load("mapillary_v1.2")
    assert h.names("class") == [n for n, _ in MAPILLARY_V12]
    assert h.colors("class").tolist() == [list(c) for _, c in MAPILLARY_V12]
    assert h.raw_lut().tolist()[:66] == list(range(66)) and h.raw_lut()[66] == -1 and h.raw_ignore == []
    assert [c.name for c in h.classes("class") if not c.evaluate] == ["void--unlabeled"]  # mmseg scores 65
    assert (h.fine_level, h.coarse_level) == ("class", "group")


def test_mapillary_v12_groups_follow_mapillary_v2_and_categories_are_the_vistas_name_prefixes():
    v12, v2 = Hierarchy.load("mapillary_v1.2"), Hierarchy.load("mapillary_v2")
    v2_group = dict(zip(v2.names("class"), (v2.names("group")[g] for g in v2.fine_to_coarse)))
    group_of = dict(zip(v12.names("class"), (v12.names("group")[g] for g in v12.fine_to_coarse)))
    assert {n: g for n, g in group_of.items() if n not in MAPILLARY_V12_ONLY} == \
        {n: v2_group[n] for n in group_of if n not in MAPILLARY_V12_ONLY}  # LogicSeg's quirks included
    assert {n: group_of[n] for n in MAPILLARY_V12_ONLY} == MAPILLARY_V12_ONLY
    assert group_of["construction--barrier--wall"] == "flat" and group_of["object--trash-can"] == "traffic_sign"
    top = v12.ancestor_lut("class", "category")
    assert [v12.names("category")[t] for t in top] == [n.split("--")[0] for n, _ in MAPILLARY_V12]
    assert v12.names("category") == v2.names("category")


# ============================================================================================
# PASCAL-Part-108
# ============================================================================================

# LTTM/GMNet general_utils.py map_parts_to_classes(21, 108) and list_classes_names(21)
PASCAL_RANGES = [[0, 1], [1, 6], [6, 10], [10, 18], [18, 19], [19, 21], [21, 29], [29, 36], [36, 45], [45, 46],
                 [46, 54], [54, 55], [55, 65], [65, 73], [73, 77], [77, 89], [89, 91], [91, 99], [99, 100],
                 [100, 107], [107, 108]]
PASCAL_OBJECTS = ["background", "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "table", "dog", "horse", "motorbike", "person", "potted_plant", "sheep", "sofa", "train", "tv"]


def test_pascal_part_ranges():
    h = Hierarchy.load("pascal_part_108")
    assert h.names("object") == PASCAL_OBJECTS
    expected = [k for k, (a, b) in enumerate(PASCAL_RANGES) for _ in range(a, b)]
    assert h.fine_to_coarse.tolist() == expected
    objects = h.names("object")
    coarse = h.raw_lut("object")
    assert objects[coarse[0]] == "background"
    assert objects[coarse[5]] == "airplane" and h.names("part")[5] == "aeroplane_wheel"
    assert objects[coarse[6]] == "bicycle" and h.names("part")[6] == "bicycle_fwheel"
    assert objects[coarse[107]] == "tv" and h.names("part")[107] == "tvmonitor_screen"
    assert h.names("part")[0] == "background"


def test_pascal_part_raw_values():
    h = Hierarchy.load("pascal_part_108")
    fine = h.raw_lut()
    assert fine[:108].tolist() == list(range(108))
    assert fine[255] == 255 and h.raw_lut("object")[255] == 255
    assert fine[108] == -1


def test_pascal_voc_colours():
    h = Hierarchy.load("pascal_part_108")
    c = h.colors("object")
    assert c[0].tolist() == [0, 0, 0]
    assert c[1].tolist() == [128, 0, 0]      # aeroplane
    assert c[15].tolist() == [192, 128, 128]  # person
    assert c[20].tolist() == [0, 64, 128]    # tvmonitor
    assert len({tuple(x) for x in h.colors("part").tolist()}) == 108


# ============================================================================================
# Invalid files: each mistake gives a message that names the class / field.
# ============================================================================================


def minimal() -> dict:
    """A valid 2-level file: a, b -> X; c -> Y; raw 1, 2, 3; raw 0 ignored."""
    return {
        "format": "hiposeg-hierarchy/1",
        "name": "toy",
        "source": "test",
        "levels": [
            {"name": "fine", "classes": [
                {"id": 0, "name": "a", "color": [10, 0, 0], "parent": "X", "raw": [1]},
                {"id": 1, "name": "b", "color": [20, 0, 0], "parent": "X", "raw": [2]},
                {"id": 2, "name": "c", "color": [30, 0, 0], "parent": "Y", "raw": [3]},
            ]},
            {"name": "coarse", "classes": [
                {"id": 0, "name": "X", "color": [0, 10, 0]},
                {"id": 1, "name": "Y", "color": [0, 20, 0]},
            ]},
        ],
        "raw": {"ignore": [0]},
    }


def load_text(tmp_path: Path, text: str) -> Hierarchy:
    p = tmp_path / "h.json"
    p.write_text(text)
    return Hierarchy.from_file(p)


def error_of(tmp_path: Path, data: dict) -> str:
    with pytest.raises(UserError) as e:
        load_text(tmp_path, json.dumps(data))
    return flat(e.value.message)


def test_minimal_is_valid(tmp_path):
    h = load_text(tmp_path, json.dumps(minimal()))
    assert h.raw_lut()[:5].tolist() == [255, 0, 1, 2, -1]
    assert h.raw_lut("coarse")[:5].tolist() == [255, 0, 0, 1, -1]


def test_malformed_json_names_line_and_column(tmp_path):
    with pytest.raises(UserError) as e:
        load_text(tmp_path, '{\n  "name": "toy",\n}\n')
    assert "not valid JSON" in e.value.message
    assert "line 3 column 1" in e.value.message
    assert "h.json" in e.value.message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Hierarchy.from_file(tmp_path / "nope.json")


def test_unknown_builtin_name():
    with pytest.raises(UserError, match="unknown hierarchy 'no_such_dataset'"):
        Hierarchy.load("no_such_dataset")


def mutate(fn) -> dict:
    d = copy.deepcopy(minimal())
    fn(d)
    return d


def _set(d: dict, path: list, value) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _del(d: dict, path: list) -> None:
    for k in path[:-1]:
        d = d[k]
    del d[path[-1]]


INVALID = {
    "duplicate name": (lambda d: _set(d, ["levels", 0, "classes", 1, "name"], "a"),
                       ["class 'a'", "duplicate name 'a'"]),
    "duplicate id": (lambda d: _set(d, ["levels", 0, "classes", 2, "id"], 1),
                     ["class 'c'", "duplicate id 1"]),
    "non-contiguous ids": (lambda d: _set(d, ["levels", 0, "classes", 2, "id"], 5),
                           ["levels[0] ('fine')", "contiguous", "missing [2]"]),
    "leaf without parent": (lambda d: _del(d, ["levels", 0, "classes", 1, "parent"]),
                            ["class 'b'", "no 'parent'"]),
    "unknown parent": (lambda d: _set(d, ["levels", 0, "classes", 2, "parent"], "Z"),
                       ["class 'c'", "parent 'Z' is not a class of level 'coarse'"]),
    "parent without children": (lambda d: d["levels"][1]["classes"].append({"id": 2, "name": "Z", "color": [1, 2, 3]}),
                                ["class 'Z'", "no children", "a parent without children"]),
    "top class with a parent": (lambda d: _set(d, ["levels", 1, "classes", 0, "parent"], "Y"),
                                ["class 'X'", "top level"]),
    "raw mapped twice": (lambda d: _set(d, ["levels", 0, "classes", 2, "raw"], [3, 1]),
                         ["class 'c'", "raw value 1 is mapped twice", "'a'"]),
    "raw on some leaves only": (lambda d: _del(d, ["levels", 0, "classes", 1, "raw"]),
                                ["every leaf class lists 'raw'", "missing on ['b']"]),
    "raw above the leaves": (lambda d: _set(d, ["levels", 1, "classes", 0, "raw"], [9]),
                             ["class 'X'", "'raw' is only allowed on the leaf level"]),
    "raw value both ignored and mapped": (lambda d: _set(d, ["raw", "ignore"], [0, 2]),
                                          ["raw.ignore", "[2]", "'b'"]),
    "colour out of range": (lambda d: _set(d, ["levels", 0, "classes", 1, "color"], [0, 256, 0]),
                            ["levels[0].classes[1].color", "class 'b'", "outside 0..255"]),
    "negative raw value": (lambda d: _set(d, ["levels", 0, "classes", 0, "raw"], [-1]),
                           ["levels[0].classes[0].raw", "class 'a'", "raw value -1"]),
    "unknown training level": (lambda d: _set(d, ["train"], {"fine": "fine", "coarse": "middle"}),
                               ["train.coarse", "unknown level 'middle'"]),
    "coarse not above fine": (lambda d: _set(d, ["train"], {"fine": "coarse", "coarse": "fine"}),
                              ["coarse level 'fine' must be above fine level 'coarse'"]),
    "fewer than 2 levels": (lambda d: _set(d, ["levels"], [{"name": "fine", "classes": [
                                {"id": 0, "name": "a", "color": [1, 1, 1]}]}]),
                            ["levels", "at least 2"]),
    "unknown field": (lambda d: _set(d, ["levels", 0, "classes", 1, "colour"], [1, 2, 3]),
                      ["levels[0].classes[1].colour", "class 'b'", "unknown field"]),
    "unknown top-level field": (lambda d: _set(d, ["ignore"], [255]),
                                ["ignore", "unknown field"]),
    "wrong format": (lambda d: _set(d, ["format"], "hiposeg-hierarchy/9"),
                     ["format", "hiposeg-hierarchy/1"]),
    "duplicate level name": (lambda d: _set(d, ["levels", 1, "name"], "fine"),
                             ["duplicate level name 'fine'"]),
    # JSON booleans and decimals are not ids or raw values (lax parsing read true as 1 and 2.0 as 2)
    "id that is a boolean": (lambda d: _set(d, ["levels", 0, "classes", 1, "id"], True),
                             ["levels[0].classes[1].id (class 'b')", "got true (a boolean): write an integer"]),
    "raw value with a decimal point": (lambda d: _set(d, ["levels", 0, "classes", 1, "raw"], [2.0]),
                                       ["levels[0].classes[1].raw[0] (class 'b')",
                                        "got 2.0 (a number with a decimal point): write an integer"]),
    "raw value that is a boolean": (lambda d: _set(d, ["levels", 0, "classes", 0, "raw"], [True]),
                                    ["levels[0].classes[0].raw[0] (class 'a')", "got true (a boolean)"]),
    "ignore value that is a boolean": (lambda d: _set(d, ["raw", "ignore"], [False]),
                                       ["raw.ignore[0]", "got false (a boolean): write an integer"]),
    "colour component that is a boolean": (lambda d: _set(d, ["levels", 0, "classes", 0, "color"], [True, 0, 0]),
                                           ["levels[0].classes[0].color[0] (class 'a')", "got true (a boolean)"]),
    "evaluate that is a number": (lambda d: _set(d, ["levels", 0, "classes", 0, "evaluate"], 1),
                                  ["levels[0].classes[0].evaluate (class 'a')",
                                   "got 1 (an integer): write true or false"]),
}


@pytest.mark.parametrize("kind", list(INVALID))
def test_invalid_file_message(tmp_path, kind):
    fn, needles = INVALID[kind]
    msg = error_of(tmp_path, mutate(fn))
    assert msg.startswith("invalid hierarchy"), msg
    assert "h.json" in msg
    for needle in needles:
        assert needle in msg, (kind, needle, msg)


def test_an_id_that_is_a_boolean_is_not_taken_for_a_duplicate(tmp_path):
    msg = error_of(tmp_path, mutate(lambda d: _set(d, ["levels", 0, "classes", 1, "id"], True)))
    assert "got true (a boolean)" in msg and "duplicate" not in msg


def test_deeply_nested_json_is_one_clear_error(tmp_path, cli):
    p = tmp_path / "deep.json"
    p.write_text('{"name": ' + "[" * 100_000 + "]" * 100_000 + "}")
    r = cli.invoke(app, ["hierarchy", "validate", str(p)])
    assert r.exit_code == 2, r.output
    assert squash(f"hierarchy file {p} nests its values too deeply") in squash(r.output)


def test_a_folder_or_device_given_as_hierarchy_file_is_refused(tmp_path):
    with pytest.raises(UserError, match=f"hierarchy file {tmp_path} is a folder, not a regular file"):
        Hierarchy.from_file(tmp_path)
    with pytest.raises(UserError, match="hierarchy file /dev/zero is a character device, not a regular file"):
        Hierarchy.from_file("/dev/zero")  # read as text, it never ends


def test_a_pipe_is_read_only_when_named_on_the_command_line(tmp_path, cli):
    """`hierarchy validate <(...)` / `--hierarchy <(...)` read a pipe the user named; anywhere else
    (`Hierarchy.from_file`, as for a prepared dataset's hierarchy.json) a FIFO is refused unopened:
    opening it would wait for a writer forever."""
    import threading

    fifo = tmp_path / "h.json"
    os.mkfifo(fifo)
    text = (builtin_dir() / "synthetic.json").read_text()
    writer = threading.Thread(target=fifo.write_text, args=(text,))
    writer.start()
    r = cli.invoke(app, ["hierarchy", "validate", str(fifo)])
    writer.join(30)
    assert r.exit_code == 0 and "valid" in r.output, r.output

    def unblock() -> None:  # should the reader open the FIFO after all: end its wait, fail the test
        time.sleep(5)
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    with pytest.raises(UserError, match=re.escape(f"hierarchy file {fifo} is a named pipe (FIFO), not a regular file")):
        Hierarchy.from_file(fifo)


def one_parent(n: int) -> dict:
    """A 2-level hierarchy with `n` leaf classes under one top class."""
    return {"name": "huge", "source": "test", "levels": [
        {"name": "leaf", "classes": [{"id": i, "name": f"c{i}", "color": [0, 0, 0], "parent": "all"}
                                     for i in range(n)]},
        {"name": "top", "classes": [{"id": 0, "name": "all", "color": [0, 0, 0]}]}]}


def test_a_level_must_fit_the_16_bit_label_maps_below_the_ignore_value(tmp_path, cli):
    """65535 classes: ids 0..65534, ignore 65535 (fits). 65536: the last id would be the ignore value,
    and more would wrap around in 16-bit PNGs, so `hierarchy validate` refuses it."""
    h = Hierarchy.from_dict(one_parent(65535))
    assert h.ignore_index == 65535 and h.label_dtype == np.uint16 and h.num_fine - 1 < h.ignore_index
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(one_parent(65536)))
    r = cli.invoke(app, ["hierarchy", "validate", str(path)])
    assert r.exit_code == 2, r.output
    assert ("levels[0] ('leaf'): 65536 classes, but prepared label maps are 16-bit PNGs in which 65535 means "
            "ignore, so a level holds at most 65535 classes (ids 0..65534)") in flat(r.output)


def test_not_an_object(tmp_path):
    with pytest.raises(UserError, match="valid dictionary"):
        load_text(tmp_path, "[1, 2, 3]")


# ============================================================================================
# Look-up tables, digest, label encoding
# ============================================================================================


def three_level() -> dict:
    """p0 p1 -> A, p2 -> B, p3 p4 -> C; A, B -> thing; C -> stuff. Identity raw, ignore 255."""
    parts = [("p0", "A"), ("p1", "A"), ("p2", "B"), ("p3", "C"), ("p4", "C")]
    return {
        "name": "three", "source": "test",
        "levels": [
            {"name": "part", "classes": [{"id": i, "name": n, "color": [i, 0, 0], "parent": p}
                                         for i, (n, p) in enumerate(parts)]},
            {"name": "object", "classes": [{"id": 0, "name": "A", "color": [0, 1, 0], "parent": "thing"},
                                           {"id": 1, "name": "B", "color": [0, 2, 0], "parent": "thing"},
                                           {"id": 2, "name": "C", "color": [0, 3, 0], "parent": "stuff"}]},
            {"name": "kind", "classes": [{"id": 0, "name": "stuff", "color": [0, 0, 1]},
                                         {"id": 1, "name": "thing", "color": [0, 0, 2]}]},
        ],
        "raw": {"ignore": [255]},
    }


def test_ancestor_lut_composes_levels():
    h = Hierarchy.from_dict(three_level())
    assert h.ancestor_lut("part", "object").tolist() == [0, 0, 1, 2, 2]
    assert h.ancestor_lut("object", "kind").tolist() == [1, 1, 0]
    assert h.ancestor_lut("part", "kind").tolist() == [1, 1, 1, 0, 0]
    assert h.ancestor_lut("object", "object").tolist() == [0, 1, 2]
    with pytest.raises(UserError, match="below"):
        h.ancestor_lut("kind", "part")
    with pytest.raises(UserError, match="no level 'nope'"):
        h.ancestor_lut("part", "nope")


def test_fine_to_coarse_default_and_explicit_levels():
    d = three_level()
    h = Hierarchy.from_dict(d)
    assert (h.fine_level, h.coarse_level) == ("part", "object")
    assert h.fine_to_coarse.tolist() == [0, 0, 1, 2, 2]
    d["train"] = {"fine": "part", "coarse": "kind"}
    h2 = Hierarchy.from_dict(d)
    assert h2.fine_to_coarse.tolist() == [1, 1, 1, 0, 0]
    assert h2.raw_lut()[:6].tolist() == [0, 1, 2, 3, 4, -1]
    assert h2.raw_lut("kind")[[0, 3, 255]].tolist() == [1, 0, 255]
    assert h2.children("object") == {0: [0, 1], 1: [2], 2: [3, 4]}
    assert h2.children("kind") == {0: [2], 1: [0, 1]}


def test_sha256_ignores_order_but_not_content():
    d = three_level()
    base = Hierarchy.from_dict(d).sha256

    shuffled = copy.deepcopy(d)
    for lvl in shuffled["levels"]:
        lvl["classes"].reverse()
        lvl["classes"] = [dict(reversed(list(c.items()))) for c in lvl["classes"]]
    shuffled = dict(reversed(list(shuffled.items())))
    shuffled["train"] = {"fine": "part", "coarse": "object"}  # the default, written out
    assert Hierarchy.from_dict(shuffled).sha256 == base

    changed = copy.deepcopy(d)
    changed["levels"][0]["classes"][3]["parent"] = "B"
    assert Hierarchy.from_dict(changed).sha256 != base
    renamed = copy.deepcopy(d)
    renamed["levels"][1]["classes"][0]["name"] += "x"
    for c in renamed["levels"][0]["classes"]:
        if c["parent"] == d["levels"][1]["classes"][0]["name"]:
            c["parent"] += "x"
    assert Hierarchy.from_dict(renamed).sha256 != base
    # display-only edits keep the digest: colours and prose do not change what a label means
    cosmetic = copy.deepcopy(d)
    cosmetic["levels"][1]["classes"][0]["color"] = [9, 9, 9]
    cosmetic["source"] = "rewritten provenance note"
    cosmetic["title"] = "A new title"
    assert Hierarchy.from_dict(cosmetic).sha256 == base


def test_sha256_ignores_order_of_raw_lists():
    d = minimal()
    d["raw"]["ignore"] = [0, 250]
    d["levels"][0]["classes"][0]["raw"] = [1, 7]
    e = copy.deepcopy(d)
    e["raw"]["ignore"] = [250, 0]
    e["levels"][0]["classes"][0]["raw"] = [7, 1]
    assert Hierarchy.from_dict(d).sha256 == Hierarchy.from_dict(e).sha256


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_to_dict_round_trips(name):
    h = Hierarchy.load(name)
    again = Hierarchy.from_dict(h.to_dict())
    assert again.sha256 == h.sha256
    assert again.to_dict() == h.to_dict()


def test_more_than_255_classes_uses_16_bit_labels():
    n = 300
    h = Hierarchy.from_dict({
        "name": "big", "source": "test",
        "levels": [
            {"name": "leaf", "classes": [{"id": i, "name": f"c{i}", "color": [i % 256, 0, 0],
                                          "parent": "even" if i % 2 == 0 else "odd"} for i in range(n)]},
            {"name": "top", "classes": [{"id": 0, "name": "even", "color": [0, 0, 0]},
                                        {"id": 1, "name": "odd", "color": [1, 1, 1]}]},
        ],
    })
    assert h.ignore_index == 65535
    assert h.label_dtype == np.uint16
    assert h.raw_lut()[299] == 299
    assert h.raw_lut("top")[[0, 1, 299]].tolist() == [0, 1, 1]
    assert h.raw_lut(unknown="ignore")[300] == 65535
    assert h.raw_lut(unknown="error")[300] == -1


def test_exactly_255_classes_still_fit_8_bit():
    h = Hierarchy.from_dict({
        "name": "edge", "source": "test",
        "levels": [
            {"name": "leaf", "classes": [{"id": i, "name": f"c{i}", "color": [i, 0, 0], "parent": "all"}
                                         for i in range(255)]},
            {"name": "top", "classes": [{"id": 0, "name": "all", "color": [0, 0, 0]}]},
        ],
    })
    assert h.ignore_index == 255 and h.label_dtype == np.uint8


# ============================================================================================
# CLI
# ============================================================================================


def test_cli_show_cityscapes(cli):
    result = cli.invoke(app, ["hierarchy", "show", "cityscapes"])
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    for name in [n for n, _, t, _, _ in CITYSCAPES_LABELS if t != 255] + CITYSCAPES_CATEGORIES:
        assert name in out, name
    assert "19 class -> 7 category" in out
    assert "fine = class, coarse = category" in out


def test_cli_show_json_is_the_normalised_form(cli):
    result = cli.invoke(app, ["hierarchy", "show", "cityscapes", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == Hierarchy.load("cityscapes").to_dict()


def test_cli_show_three_levels(cli):
    result = cli.invoke(app, ["hierarchy", "show", "mapillary_v2"])
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "124 class -> 17 group -> 7 category" in out
    assert "construction--barrier--wall" in out and "not evaluated" in out


def test_cli_validate_good_file(tmp_path, cli):
    p = tmp_path / "good.json"
    p.write_text(json.dumps(minimal()))
    result = cli.invoke(app, ["hierarchy", "validate", str(p)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "3 fine -> 2 coarse" in flat(result.output)


def test_cli_validate_bad_file(tmp_path, cli):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(mutate(lambda d: _set(d, ["levels", 0, "classes", 2, "parent"], "Z"))))
    result = cli.invoke(app, ["hierarchy", "validate", str(p)])
    assert result.exit_code == 2
    out = flat(result.output)
    assert "parent 'Z' is not a class of level 'coarse'" in out
    assert "Traceback" not in result.output


def test_cli_validate_malformed_json(tmp_path, cli):
    p = tmp_path / "broken.json"
    p.write_text('{"name": "x",,}')
    result = cli.invoke(app, ["hierarchy", "validate", str(p)])
    assert result.exit_code == 2
    assert "line 1 column 14" in flat(result.output)
    assert "Traceback" not in result.output


def test_cli_prints_names_with_rich_markup_as_text(tmp_path, cli):
    """Level and class names (and file names) are data: `[/x]` or `[bold]` in them is printed as
    written, never parsed as Rich markup (an unmatched closing tag used to end in MarkupError)."""
    spec = mutate(lambda d: (_set(d, ["levels", 0, "name"], "[/fine]"), _set(d, ["levels", 1, "name"], "[bold]top"),
                             _set(d, ["levels", 0, "classes", 0, "name"], "a[/]"),
                             _set(d, ["train"], {"fine": "[/fine]", "coarse": "[bold]top"})))
    p = tmp_path / "[red]h.json"
    p.write_text(json.dumps(spec))
    printed = {}
    for command in ("validate", "show"):
        result = cli.invoke(app, ["hierarchy", command, str(p)])
        assert result.exit_code == 0, (command, result.output, result.exception)
        printed[command] = squash(result.output)
        assert "[/fine]" in printed[command] and "[bold]top" in printed[command], (command, result.output)
    assert "[red]h.json" in printed["validate"] and "a[/]" in printed["show"]


@pytest.mark.parametrize("path, where", [
    (["levels", 0, "classes", 0, "name"], "levels[0].classes[0].name (class "),
    (["levels", 1, "name"], "levels[1].name"),
    (["levels", 0, "classes", 1, "description"], "levels[0].classes[1].description (class 'b')"),
    (["title"], "title"),
    (["source"], "source"),
])
@pytest.mark.parametrize("char, named", [
    ("\x1b", "U+001B ESC"), ("\x7f", "U+007F DEL"), ("\n", "U+000A LF"), ("\x9b", "U+009B CSI"),
    ("\u202e", "U+202E RIGHT-TO-LEFT OVERRIDE"), ("\u2066", "U+2066 LEFT-TO-RIGHT ISOLATE"),
    ("\u200b", "U+200B ZERO WIDTH SPACE"), ("\u2028", "U+2028 LINE SEPARATOR"),
])
def test_control_and_format_characters_in_printed_strings_are_refused(tmp_path, cli, path, where, char, named):
    """Names, titles and sources reach the terminal (`hierarchy show`, eval tables): an ESC there
    cleared the screen, printed fake output or planted OSC 8 links; bidi and zero-width characters
    make a name read as another. Refused naming the field and the character; nothing is echoed raw."""
    spec = mutate(lambda d: _set(d, path, f"sky{char}[2J\x1b]8;;http://evil.example/\x1b\\fake"))
    p = tmp_path / "esc.json"
    p.write_text(json.dumps(spec))
    for command in ("validate", "show"):
        r = cli.invoke(app, ["hierarchy", command, str(p)])
        assert r.exit_code == 2, (command, r.output)
        assert squash(f"{where}") in squash(r.output) and squash(f"the character {named}") in squash(r.output), r.output
        assert (char == "\n" or char not in r.output) and "\x1b" not in r.output, r.output
    with pytest.raises(UserError, match=re.escape(named)):  # a model's or dataset's embedded hierarchy
        Hierarchy.from_dict(spec)


def test_cli_show_unknown_name(cli):
    result = cli.invoke(app, ["hierarchy", "show", "no_such_dataset"])
    assert result.exit_code == 2
    assert "unknown hierarchy" in flat(result.output)
    assert "Traceback" not in result.output


def test_cli_version(cli):
    result = cli.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"hiposeg {hiposeg.__version__}"
