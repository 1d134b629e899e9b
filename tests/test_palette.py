"""The hierarchy-aware palette: children of one parent share their parent's hue sector, colours stay
apart under normal vision and simulated colour-vision deficiencies, and `predict --palette families`
paints overlays with it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import fails_with
from hiposeg.cli import app
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.palette import (CVD_MATRICES, family_palette, level_palette, min_distance, parent_palette,
                             parents_in_hue_order, rgb_to_lab, sector_layout, simulate_cvd)

HUE_SLACK = 4.0  # degrees: rounding a low-chroma colour to 8 bits moves its hue a little


def hue(rgb: np.ndarray) -> np.ndarray:
    lab = rgb_to_lab(rgb)
    return np.degrees(np.arctan2(lab[:, 2], lab[:, 1])) % 360


def angle(a: np.ndarray, b: float) -> np.ndarray:
    return np.abs((a - b + 180) % 360 - 180)


@pytest.mark.parametrize("name", ["synthetic", "cityscapes", "ade20k", "mapillary_v2", "pascal_part_108"])
def test_children_and_their_parent_take_the_parents_hue_sector(name):
    h = Hierarchy.load(name)
    fine, coarse = h.fine_level, h.level_names[h.level_index(h.fine_level) + 1]
    order = parents_in_hue_order(h, coarse)
    centres, width = sector_layout(len(order))
    centre_of = dict(zip(order, centres))
    pi = h.ancestor_lut(fine, coarse)
    children = family_palette(h, fine)
    assert np.all(angle(hue(children), np.array([centre_of[p] for p in pi])) <= width / 2 + HUE_SLACK)
    parents = parent_palette(h, fine)
    assert np.all(angle(hue(parents), np.array([centre_of[p] for p in range(len(parents))])) <= width / 2 + HUE_SLACK)
    np.testing.assert_array_equal(children, family_palette(h, fine))  # deterministic


@pytest.mark.parametrize("name, at_least", [("synthetic", 15.0), ("cityscapes", 12.0), ("ade20k", 2.5),
                                            ("mapillary_v2", 2.5), ("pascal_part_108", 2.5)])
def test_colours_stay_apart_for_normal_and_colour_blind_vision(name, at_least):
    """The smallest CIELAB ΔE between two fine colours, over normal vision and simulated protanopia,
    deuteranopia and tritanopia; the built-in hierarchies' own colours repeat for the large sets (ΔE 0)."""
    h = Hierarchy.load(name)
    ours = min_distance(family_palette(h, h.fine_level))
    assert ours >= at_least
    assert ours > min_distance(h.colors(h.fine_level))
    assert min_distance(parent_palette(h, h.fine_level)) >= 12.0  # up to 21 parents (PASCAL-Part)


def test_colour_vision_simulation_matches_known_values():
    """Machado et al.: pure red and green collapse towards one olive under deuteranopia; white and black
    stay themselves under every simulation."""
    rgb = np.array([[255, 0, 0], [0, 255, 0], [255, 255, 255], [0, 0, 0]], np.uint8)
    for kind in CVD_MATRICES:
        seen = simulate_cvd(rgb, kind)
        np.testing.assert_array_equal(seen[2:], rgb[2:])
    d = simulate_cvd(rgb[:2], "deuteranopia")
    normal = np.linalg.norm(rgb_to_lab(rgb[:1]) - rgb_to_lab(rgb[1:2]))
    assert np.linalg.norm(rgb_to_lab(d[:1]) - rgb_to_lab(d[1:2])) < normal / 3


def test_level_palette_choices():
    h = Hierarchy.load("cityscapes")
    np.testing.assert_array_equal(level_palette(h, "class"), h.colors("class"))  # the default: the file's colours
    np.testing.assert_array_equal(level_palette(h, "category", "families"), parent_palette(h, "class"))
    with pytest.raises(UserError, match="--palette 'rainbow' is not one of hierarchy, families"):
        level_palette(h, "class", "rainbow")


def test_predict_paints_overlays_with_the_family_palette_when_asked(tiny_run, exported_models, tmp_path):
    from typer.testing import CliRunner

    data, _ = tiny_run
    image = sorted((data / "val" / "images").iterdir())[0]
    h = Hierarchy.from_file(data / "hierarchy.json")
    for palette in ("hierarchy", "families"):
        out = tmp_path / palette
        r = CliRunner().invoke(app, ["predict", str(exported_models["hiposeg"]), str(image), "--out", str(out),
                                     "--palette", palette, "--alpha", "1", "--overlay", "both", "--device", "cpu",
                                     "--workers", "0", "-q"])
        assert r.exit_code == 0, r.output
        fine = cv2.imread(str(out / "fine" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
        coarse = cv2.imread(str(out / "coarse" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
        for level, ids, folder in ((h.fine_level, fine, "overlay"), (h.coarse_level, coarse, "overlay-coarse")):
            overlay = cv2.cvtColor(cv2.imread(str(out / folder / f"{image.stem}.png")), cv2.COLOR_BGR2RGB)
            np.testing.assert_array_equal(overlay, level_palette(h, level, palette)[ids])  # alpha 1: the palette
    fails_with(["predict", exported_models["hiposeg"], image, "--out", tmp_path / "bad", "--palette", "rainbow"],
               "--palette 'rainbow' is not one of hierarchy, families")
    assert not (tmp_path / "bad").exists()
