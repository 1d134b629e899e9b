"""Each converter on files in its release's real raw format: the real-format samples (`real_sample`,
when present) and trees built here, checked against label tables typed or
derived plainly in the test (not through hiposeg's LUT code)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import real_sample
from hiposeg.data.ade20k import ADE20K
from hiposeg.data.cityscapes import Cityscapes
from hiposeg.data.folder import Folder
from hiposeg.data.mapillary import Mapillary
from hiposeg.data.pascal_part import PascalPart
from hiposeg.data.prepare import prepare
from hiposeg.errors import UserError
from hiposeg.hierarchy import builtin_dir

# Cityscapes labelIds -> trainIds and trainId -> category (cityscapesScripts labels.py, typed by hand).
CITY_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITY_CATEGORY = [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6]  # flat construction object nature sky human vehicle


def remap(values: np.ndarray, table: dict[int, int], default: int = 255) -> np.ndarray:
    out = np.full(values.shape, default, np.uint8)
    for k, v in table.items():
        out[values == k] = v
    return out


def city_expected(label_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    coarse_table = {raw: CITY_CATEGORY[t] for raw, t in CITY_TRAIN_ID.items()}
    return remap(label_ids, CITY_TRAIN_ID), remap(label_ids, coarse_table)


def json_tables(name: str) -> tuple[dict[int, int], dict[int, int], set[int]]:
    """(raw -> fine id, raw -> coarse id, raw ignore values) read plainly from hierarchies/NAME.json."""
    spec = json.loads((builtin_dir() / f"{name}.json").read_text())
    leaves, parents = spec["levels"][0]["classes"], spec["levels"][1]["classes"]
    assert spec["train"] == {"fine": spec["levels"][0]["name"], "coarse": spec["levels"][1]["name"]}
    parent_id = {c["name"]: c["id"] for c in parents}
    fine, coarse = {}, {}
    for c in leaves:
        for r in c.get("raw", [c["id"]]):
            fine[r], coarse[r] = c["id"], parent_id[c["parent"]]
    return fine, coarse, set(spec.get("raw", {}).get("ignore", []))


def read(path: Path, palette_indices: bool = False) -> np.ndarray:
    """A PNG as stored (cv2), or a palette PNG's indices (hiposeg's palette decoder)."""
    if palette_indices:
        from hiposeg.data.dataset import read_label

        return read_label(path)
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert a is not None, path
    return a


def write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def blocks(h: int, w: int, values: list[int], seed: int, dtype=np.uint8) -> np.ndarray:
    """A label map holding every value in `values` (as 4x4 blocks, then random blocks)."""
    rng = np.random.default_rng(seed)
    n_blocks = (h // 4) * (w // 4)
    assert n_blocks >= len(values)
    cells = np.concatenate([values, rng.choice(values, n_blocks - len(values))]).astype(dtype)
    rng.shuffle(cells)
    return np.kron(cells.reshape(h // 4, w // 4), np.ones((4, 4), dtype)).astype(dtype)


def check_outputs(out: Path, split: str, stem: str, fine: np.ndarray, coarse: np.ndarray) -> None:
    got_f, got_c = read(out / split / "fine" / f"{stem}.png"), read(out / split / "coarse" / f"{stem}.png")
    assert got_f.dtype == fine.dtype and got_f.shape == fine.shape
    np.testing.assert_array_equal(got_f, fine)
    np.testing.assert_array_equal(got_c, coarse)


# ------------------------------------------------------------------------------------------
# Cityscapes
# ------------------------------------------------------------------------------------------


def test_cityscapes_real_sample_gives_official_train_ids_and_categories(tmp_path):
    raw = real_sample("cityscapes")
    m = prepare(Cityscapes(), raw, tmp_path / "cs", workers=1, quiet=True)
    stem = "frankfurt_000000_000294"
    label_ids = read(raw / "gtFine/val/frankfurt" / f"{stem}_gtFine_labelIds.png")
    assert label_ids.dtype == np.uint8 and label_ids.ndim == 2
    fine, coarse = city_expected(label_ids)
    check_outputs(tmp_path / "cs", "val", stem, fine, coarse)
    link = tmp_path / "cs/val/images" / f"{stem}.png"
    raw_image = raw / "leftImg8bit/val/frankfurt" / f"{stem}_leftImg8bit.png"
    assert link.is_symlink() and Path(os.readlink(link)) == raw_image.absolute()
    # instanceIds // 1000 agrees with labelIds on instance pixels: an independent check of the same frame
    inst = read(raw / "gtFine/val/frankfurt" / f"{stem}_gtFine_instanceIds.png")
    ids_from_inst = np.where(inst >= 1000, inst // 1000, inst).astype(np.uint8)
    np.testing.assert_array_equal(city_expected(ids_from_inst)[0], fine)
    assert m["missing_splits"] == ["train"] and m["splits"]["val"]["images"] == 1
    assert m["splits"]["val"]["pixels"]["fine"]["road"] == int((label_ids == 7).sum())
    assert m["splits"]["val"]["pixels"]["ignore"] == int((fine == 255).sum())


def make_cityscapes(raw: Path, per_split: dict[str, list[tuple[str, int]]], h: int = 32,
                    w: int = 64) -> dict[str, np.ndarray]:
    """leftImg8bit + gtFine trees; labels hold every id 0..33. Returns {stem: labelIds}."""
    labels = {}
    for split, frames in per_split.items():
        for city, n in frames:
            for i in range(n):
                stem = f"{city}_{i:06d}_000019"
                lab = blocks(h, w, list(range(34)), seed=len(labels))
                write(raw / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image(h, w, len(labels)))
                write(raw / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)
                write(raw / "gtFine" / split / city / f"{stem}_gtFine_color.png", image(h, w, 99))  # not read
                labels[stem] = lab
    return labels


def test_cityscapes_tree_every_label_id(tmp_path):
    raw = tmp_path / "raw"
    labels = make_cityscapes(raw, {"train": [("aachen", 2), ("bochum", 1)], "val": [("lindau", 2)]})
    m = prepare(Cityscapes(), raw, tmp_path / "out", workers=2, quiet=True)
    for stem, lab in labels.items():
        split = "val" if stem.startswith("lindau") else "train"
        check_outputs(tmp_path / "out", split, stem, *city_expected(lab))
    assert m["splits"]["train"]["images"] == 3 and m["splits"]["val"]["images"] == 2
    assert m["missing_splits"] == []
    assert m["hierarchy"]["name"] == "cityscapes" and m["source"] == "cityscapes"
    total = sum(int((city_expected(v)[0] == 2).sum()) for k, v in labels.items() if not k.startswith("lindau"))
    assert m["splits"]["train"]["pixels"]["fine"]["building"] == total
    assert json.loads((tmp_path / "out/hierarchy.json").read_text())["name"] == "cityscapes"


# ------------------------------------------------------------------------------------------
# ADE20K
# ------------------------------------------------------------------------------------------


def test_ade20k_real_samples_shift_by_one(tmp_path):
    raw = real_sample("ade20k/ADEChallengeData2016")
    prepare(ADE20K(), raw, tmp_path / "ade", workers=1, quiet=True)
    _, coarse_of, _ = json_tables("ade20k")
    for n in (1, 2, 3):
        stem = f"ADE_val_{n:08d}"
        ann = read(raw / "annotations/validation" / f"{stem}.png")
        fine = np.where(ann == 0, 255, ann.astype(np.int64) - 1).astype(np.uint8)
        check_outputs(tmp_path / "ade", "val", stem, fine, remap(ann, coarse_of))


def test_ade20k_every_value_0_to_150(tmp_path):
    raw = tmp_path / "ADEChallengeData2016"
    anns = {}
    for split, release in (("train", "training"), ("val", "validation")):
        for i in range(2):
            stem = f"ADE_{split}_{i + 1:08d}"
            ann = blocks(64, 40, list(range(151)), seed=i + 7 * len(anns))
            write(raw / "images" / release / f"{stem}.jpg", image(64, 40, i))
            write(raw / "annotations" / release / f"{stem}.png", ann)
            anns[(split, stem)] = ann
    m = prepare(ADE20K(), raw, tmp_path / "out", workers=1, quiet=True)
    fine_of, coarse_of, ignore = json_tables("ade20k")
    assert ignore == {0} and fine_of == {v: v - 1 for v in range(1, 151)}  # the hierarchy file states v -> v-1
    for (split, stem), ann in anns.items():
        fine = np.where(ann == 0, 255, ann.astype(np.int64) - 1).astype(np.uint8)
        check_outputs(tmp_path / "out", split, stem, fine, remap(ann, coarse_of))
        assert (tmp_path / "out" / split / "images" / f"{stem}.jpg").is_symlink()
    assert all(v > 0 for v in m["splits"]["train"]["pixels"]["fine"].values())  # every class seen


# ------------------------------------------------------------------------------------------
# Mapillary Vistas 2.0: palette PNGs read as indices
# ------------------------------------------------------------------------------------------


def test_mapillary_real_sample_reads_palette_indices(tmp_path):
    raw = real_sample("mapillary/config_v2.0.json").parent  # the reconstructed config (its README) is needed too
    label = raw / "validation/v2.0/labels/__CRyFzoDOXn6unQ6a3DnQ.png"
    assert cv2.imread(str(label), cv2.IMREAD_UNCHANGED).ndim == 3  # cv2 alone would give RGB
    m = prepare(Mapillary(), raw, tmp_path / "map", workers=1, quiet=True)
    fine = read(tmp_path / "map/val/fine/__CRyFzoDOXn6unQ6a3DnQ.png")
    assert set(np.unique(fine).tolist()) == {27, 84, 85}
    # the palette colours of those indices are the config's colours: decode RGB -> id independently
    config = json.loads((raw / "config_v2.0.json").read_text())["labels"]
    rgb = cv2.cvtColor(cv2.imread(str(label), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    from_rgb = np.full(fine.shape, 255, np.uint8)
    for i in (27, 84, 85):
        from_rgb[(rgb == config[i]["color"]).all(-1)] = i
    np.testing.assert_array_equal(fine, from_rgb)
    _, coarse_of, _ = json_tables("mapillary_v2")
    np.testing.assert_array_equal(read(tmp_path / "map/val/coarse/__CRyFzoDOXn6unQ6a3DnQ.png"), remap(fine, coarse_of))
    assert m["splits"]["val"]["pixels"]["fine"]["construction--structure--building"] == int((fine == 27).sum())


def mapillary_config(path: Path, hierarchy: str = "mapillary_v2") -> list[dict]:
    """A config_VERSION.json whose labels are the leaves of a built-in hierarchy, in raw-value order."""
    spec = json.loads((builtin_dir() / f"{hierarchy}.json").read_text())
    leaves = sorted(spec["levels"][0]["classes"], key=lambda c: c.get("raw", [c["id"]])[0])
    labels = [{"name": c["name"], "readable": c["name"], "color": c["color"], "instances": False,
               "evaluate": c.get("evaluate", True)} for c in leaves]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"labels": labels, "version": path.stem.split("_v")[-1]}))
    return labels


def test_mapillary_palette_tree_all_124_ids(tmp_path, write_palette_png):
    raw = tmp_path / "vistas"
    labels = mapillary_config(raw / "config_v2.0.json")
    colours = np.array([c["color"] for c in labels] + [[0, 0, 0]] * (256 - len(labels)))
    misleading = np.roll(colours, 1, axis=0)  # palette colours that name the wrong class: must be ignored
    idx = {}
    for split, release in (("train", "training"), ("val", "validation")):
        key = f"{'k' * 21}{split[0]}"
        idx[split] = blocks(48, 44, list(range(124)), seed=len(idx))
        write(raw / release / "images" / f"{key}.jpg", image(48, 44, 3))
        p = write_palette_png(raw / release / "v2.0/labels" / f"{key}.png", idx[split], misleading)
        assert cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape == (48, 44, 3)  # a real palette PNG
    prepare(Mapillary(), raw, tmp_path / "out", workers=1, quiet=True)
    fine_of, coarse_of, _ = json_tables("mapillary_v2")
    assert fine_of == {i: i for i in range(124)}
    for split in idx:
        key = f"{'k' * 21}{split[0]}"
        check_outputs(tmp_path / "out", split, key, idx[split], remap(idx[split], coarse_of))

    # --ignore-unevaluated: the "evaluate": false classes become ignore
    prepare(Mapillary(), raw, tmp_path / "out2", workers=1, quiet=True, ignore_unevaluated=True)
    unevaluated = [i for i, c in enumerate(labels) if not c["evaluate"]]
    assert 123 in unevaluated and len(unevaluated) == 8
    fine = read(tmp_path / "out2/train/fine" / f"{'k' * 21}t.png")
    expected = np.where(np.isin(idx["train"], unevaluated), 255, idx["train"]).astype(np.uint8)
    np.testing.assert_array_equal(fine, expected)


# The real sample's v1.2 and v2.0 labels mark the same pixels: v1.2 ids (mmsegmentation MapillaryDataset_v1
# order) -> (v2.0 id, the v1.2 class's group in mapillary_v1.2).
V12_SAMPLE = {17: (27, "structure"), 44: (84, "support"), 45: (85, "support")}  # building, street light, pole


def test_mapillary_v12_real_sample_is_detected_from_the_layout_and_read_as_v12_ids(tmp_path):
    """A v1.2 download (config_v1.2.json, v1.2/labels, no v2.0): prepared with the mapillary_v1.2
    hierarchy, without any flag. The real v1.2 label is read as palette indices, checked pixel by pixel
    against the same image's real v2.0 label and against its own palette colours."""
    sample = real_sample("mapillary/validation")
    label = sample / "v1.2/labels/__CRyFzoDOXn6unQ6a3DnQ.png"
    raw = tmp_path / "vistas-v1.2"
    (raw / "validation/v1.2").mkdir(parents=True)
    (raw / "validation/images").symlink_to(sample / "images")
    (raw / "validation/v1.2/labels").symlink_to(sample / "v1.2/labels")
    labels = mapillary_config(raw / "config_v1.2.json", "mapillary_v1.2")
    assert len(labels) == 66
    m = prepare(Mapillary(), raw, tmp_path / "out", workers=1, quiet=True)
    assert m["hierarchy"]["name"] == "mapillary_v1.2" and m["options"]["release"] == "v1.2"
    fine = read(tmp_path / "out/val/fine/__CRyFzoDOXn6unQ6a3DnQ.png")
    assert set(np.unique(fine).tolist()) == set(V12_SAMPLE)
    v2 = read(sample / "v2.0/labels/__CRyFzoDOXn6unQ6a3DnQ.png", palette_indices=True)
    for v12_id, (v2_id, _) in V12_SAMPLE.items():
        np.testing.assert_array_equal(fine == v12_id, v2 == v2_id)
    rgb = cv2.cvtColor(cv2.imread(str(label), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    for v12_id in V12_SAMPLE:  # the file's own palette colour of each id is the v1.2 colour of that class
        assert (rgb[fine == v12_id] == labels[v12_id]["color"]).all()
    groups = json.loads((tmp_path / "out/hierarchy.json").read_text())["levels"][1]["classes"]
    coarse = read(tmp_path / "out/val/coarse/__CRyFzoDOXn6unQ6a3DnQ.png")
    for v12_id, (_, group) in V12_SAMPLE.items():
        assert {groups[c]["name"] for c in np.unique(coarse[fine == v12_id]).tolist()} == {group}


def test_mapillary_release_is_chosen_by_layout_or_by_flag(tmp_path, write_palette_png):
    """A v2.0 download holds both versions: v2.0 is prepared (and said so); --release v1.2 prepares the
    other; a layout that has only one version's labels, or a wrong --release, says what to do."""
    raw = tmp_path / "vistas"
    key = "k" * 22
    write(raw / "validation/images" / f"{key}.jpg", image(8, 8, 0))
    write_palette_png(raw / "validation/v2.0/labels" / f"{key}.png", np.full((8, 8), 108, np.uint8), np.zeros((256, 3)))
    write_palette_png(raw / "validation/v1.2/labels" / f"{key}.png", np.full((8, 8), 55, np.uint8), np.zeros((256, 3)))
    mapillary_config(raw / "config_v2.0.json")
    mapillary_config(raw / "config_v1.2.json", "mapillary_v1.2")
    v2 = prepare(Mapillary(), raw, tmp_path / "v2", workers=1, quiet=True)
    assert v2["hierarchy"]["name"] == "mapillary_v2" and v2["options"]["release"] == "v2.0"
    assert any("--release v1.2" in note for note in v2["_run"]["notes"])
    assert np.unique(read(tmp_path / "v2/val/fine" / f"{key}.png")).tolist() == [108]  # object--vehicle--car
    v1 = prepare(Mapillary(release="v1.2"), raw, tmp_path / "v1", workers=1, quiet=True)
    assert v1["hierarchy"]["name"] == "mapillary_v1.2" and v1["options"]["release"] == "v1.2"
    assert np.unique(read(tmp_path / "v1/val/fine" / f"{key}.png")).tolist() == [55]  # object--vehicle--car
    shutil.rmtree(raw / "validation/v2.0")  # a config_v2.0.json but only v1.2 labels: v2.0 is asked for
    with pytest.raises(UserError, match="v2.0/labels is missing") as e:
        prepare(Mapillary(), raw, tmp_path / "v2b", workers=1, quiet=True)
    assert "add --release v1.2" in e.value.hint
    with pytest.raises(UserError, match="--release 'v1.1' is not a Mapillary Vistas version"):
        Mapillary(release="v1.1")


@pytest.mark.parametrize("bit_depth", [1, 2, 4])
def test_low_bit_depth_palette_pngs_decode_to_indices(tmp_path, write_palette_png, bit_depth):
    from hiposeg.data.dataset import read_label

    n = 1 << bit_depth
    idx = np.random.default_rng(bit_depth).integers(0, n, (7, 13), dtype=np.uint8)
    p = write_palette_png(tmp_path / "p.png", idx, np.random.default_rng(0).integers(0, 256, (n, 3)), bit_depth)
    np.testing.assert_array_equal(read_label(p), idx)


# ------------------------------------------------------------------------------------------
# PASCAL-Part-108: both layouts
# ------------------------------------------------------------------------------------------

VOC_IDS = ["2008_000045", "2008_000112", "2009_001234", "2010_004321"]


def part_labels(seed: int) -> np.ndarray:
    return blocks(40, 48, list(range(108)) + [255], seed=seed)


def gmnet_release(raw: Path, image_dir: str = "RGB", image_ext: str = ".jpg") -> dict[str, np.ndarray]:
    """GMNet-style tree: images, 108-part labels, a 58-part decoy variant, split lists 3 train / 1 val."""
    labels = {}
    for i, voc in enumerate(VOC_IDS):
        write(raw / image_dir / f"{voc}{image_ext}", image(40, 48, i))
        labels[voc] = part_labels(i)
        write(raw / "label108/gray/all" / f"{voc}.png", labels[voc])
        write(raw / "label58/gray/all" / f"{voc}.png", (labels[voc] % 58).astype(np.uint8))
    (raw / "lists").mkdir()
    (raw / "lists/train.txt").write_text("\n".join(VOC_IDS[:3]) + "\n")
    (raw / "lists/val.txt").write_text(VOC_IDS[3] + "\n")
    return labels


def add_colour_visualisations(folder: Path, labels: dict[str, np.ndarray]) -> None:
    """Colour PNGs named like the labels (what GMNet's label*/color/ folders hold)."""
    for voc, lab in labels.items():
        write(folder / f"{voc}.png", np.stack([lab, 255 - lab, lab // 2], axis=-1))


def test_pascal_part_gmnet_release(tmp_path):
    raw = tmp_path / "data"
    labels = gmnet_release(raw)
    m = prepare(PascalPart(), raw, tmp_path / "out", workers=1, quiet=True)
    _, coarse_of, ignore = json_tables("pascal_part_108")
    assert ignore == {255}
    for voc, lab in labels.items():
        split = "val" if voc == VOC_IDS[3] else "train"
        check_outputs(tmp_path / "out", split, voc, lab, remap(lab, coarse_of))
    assert m["options"]["layout"] == "gmnet" and m["options"]["labels"] == "label108/gray/all"
    assert m["splits"]["train"]["images"] == 3


def test_pascal_part_gmnet_colour_label_folders_are_not_images(tmp_path):
    """label108/color/ (colour PNGs with the VOC-id names) is a visualisation of the labels: the
    images come from RGB/ even though "108" is in the decoy's path; RGB/ also wins by its name over
    a colour folder outside the label folders."""
    raw = tmp_path / "data"
    labels = gmnet_release(raw)
    add_colour_visualisations(raw / "label108/color/all", labels)
    add_colour_visualisations(raw / "label58/color/all", labels)
    add_colour_visualisations(raw / "colour", labels)
    m = prepare(PascalPart(), raw, tmp_path / "out", workers=1, quiet=True)
    assert m["options"]["images"] == "RGB" and m["options"]["labels"] == "label108/gray/all"
    for voc in VOC_IDS:
        split = "val" if voc == VOC_IDS[3] else "train"
        link = tmp_path / "out" / split / "images" / f"{voc}.jpg"
        assert os.readlink(link) == str((raw / "RGB" / f"{voc}.jpg").resolve())


def test_pascal_part_gmnet_image_folder_by_name_or_flag(tmp_path):
    raw = tmp_path / "data"
    labels = gmnet_release(raw, image_dir="Immagini_png")  # the images folder of GMNet's own scripts
    add_colour_visualisations(raw / "label108/color/all", labels)
    m = prepare(PascalPart(), raw, tmp_path / "out", workers=1, quiet=True)
    assert m["options"]["images"] == "Immagini_png"  # the only image folder outside label108/
    add_colour_visualisations(raw / "colour", labels)  # beside the images, named like neither
    with pytest.raises(UserError, match="several folders under .* hold images: Immagini_png, colour") as e:
        prepare(PascalPart(), raw, tmp_path / "out2", workers=1, quiet=True)
    assert "--images DIR" in str(e.value)
    m = prepare(PascalPart(images=Path("Immagini_png")), raw, tmp_path / "out2", workers=1, quiet=True)
    assert m["options"]["images"] == "Immagini_png" and m["splits"]["train"]["images"] == 3


def test_pascal_part_gmnet_inside_a_label_named_wrapper(tmp_path):
    """A wrapper folder whose name starts like a label folder (Labeled_PascalPart/) does not hide the
    PNG images inside it: only the innermost label-named folder (label108/) holds visualisations."""
    raw = tmp_path / "data"
    labels = gmnet_release(raw / "Labeled_PascalPart", image_ext=".png")
    add_colour_visualisations(raw / "Labeled_PascalPart/label108/color/all", labels)
    m = prepare(PascalPart(), raw, tmp_path / "out", workers=1, quiet=True)
    assert m["options"]["images"] == "Labeled_PascalPart/RGB"
    assert m["options"]["labels"] == "Labeled_PascalPart/label108/gray/all"


def test_pascal_part_reorganised_layout(tmp_path):
    raw = tmp_path / "pp"
    labels = {}
    for i, voc in enumerate(VOC_IDS):
        split = "train" if i < 2 else "val"
        write(raw / "img_dir" / split / f"{voc}.jpg", image(40, 48, i))
        labels[voc] = (split, part_labels(10 + i))
        write(raw / "ann108_dir" / split / f"{voc}.png", labels[voc][1])
    m = prepare(PascalPart(), raw, tmp_path / "out", workers=1, quiet=True)
    _, coarse_of, _ = json_tables("pascal_part_108")
    for voc, (split, lab) in labels.items():
        check_outputs(tmp_path / "out", split, voc, lab, remap(lab, coarse_of))
    assert m["options"]["layout"] == "img_dir/ann108_dir"


# ------------------------------------------------------------------------------------------
# folder: a user's own data and hierarchy
# ------------------------------------------------------------------------------------------

USER_HIERARCHY = {
    "format": "hiposeg-hierarchy/1", "name": "fruit", "source": "test",
    "levels": [
        {"name": "part", "classes": [
            {"id": 0, "name": "peel", "color": [255, 128, 0], "parent": "orange", "raw": [10]},
            {"id": 1, "name": "pulp", "color": [255, 200, 0], "parent": "orange", "raw": [11, 12]},
            {"id": 2, "name": "stem", "color": [0, 128, 0], "parent": "apple", "raw": [20]},
        ]},
        {"name": "fruit", "classes": [
            {"id": 0, "name": "orange", "color": [255, 128, 0]},
            {"id": 1, "name": "apple", "color": [200, 0, 0]},
        ]},
    ],
    "raw": {"ignore": [0]},
}
USER_FINE = {10: 0, 11: 1, 12: 1, 20: 2}
USER_COARSE = {10: 0, 11: 0, 12: 0, 20: 1}


def user_hierarchy(tmp_path: Path) -> Path:
    p = tmp_path / "fruit.json"
    p.write_text(json.dumps(USER_HIERARCHY))
    return p


def test_folder_split_subfolders_with_index_masks(tmp_path):
    raw = tmp_path / "mine"
    masks = {}
    for split in ("train", "val", "test"):
        for i in range(2):
            stem = f"{split}-img{i}"
            write(raw / split / "images" / f"{stem}.png", image(24, 32, i))
            masks[(split, stem)] = blocks(24, 32, [0, 10, 11, 12, 20], seed=i)
            write(raw / split / "masks" / f"{stem}.png", masks[(split, stem)])
    m = prepare(Folder(), raw, tmp_path / "out", hierarchy=user_hierarchy(tmp_path), workers=1, quiet=True)
    assert set(m["splits"]) == {"train", "val", "test"}
    for (split, stem), mask in masks.items():
        check_outputs(tmp_path / "out", split, stem, remap(mask, USER_FINE), remap(mask, USER_COARSE))


def test_folder_colour_masks_and_val_fraction(tmp_path):
    raw = tmp_path / "flat"
    colours = {c["id"]: c["color"] for c in USER_HIERARCHY["levels"][0]["classes"]}
    truth = {}
    for i in range(20):
        stem = f"img{i:02d}"
        leaf = blocks(16, 16, [0, 1, 2], seed=i)
        rgb = np.array([colours[k] for k in range(3)], np.uint8)[leaf]
        write(raw / "images" / f"{stem}.jpg", image(16, 16, i))
        write(raw / "labels" / f"{stem}.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        truth[stem] = leaf
    m = prepare(Folder(val_fraction=0.25, seed=3), raw, tmp_path / "out", hierarchy=user_hierarchy(tmp_path), workers=1,
                quiet=True)
    val = {p.stem for p in (tmp_path / "out/val/fine").iterdir()}
    train = {p.stem for p in (tmp_path / "out/train/fine").iterdir()}
    assert val and train and not val & train and len(val | train) == 20
    assert m["options"] == {**m["options"], "layout": "flat", "val_fraction": 0.25, "seed": 3}
    for stem, leaf in truth.items():
        split = "val" if stem in val else "train"
        check_outputs(tmp_path / "out", split, stem, leaf.astype(np.uint8), np.array([0, 0, 1], np.uint8)[leaf])
    # the split is a pure function of (seed, stem): the same on a second run, different with another seed
    m2 = prepare(Folder(val_fraction=0.25, seed=3), raw, tmp_path / "again", hierarchy=user_hierarchy(tmp_path),
                 workers=1, quiet=True)
    assert {p.stem for p in (tmp_path / "again/val/fine").iterdir()} == val and m2["splits"]["val"]["images"] == len(val)
    prepare(Folder(val_fraction=0.25, seed=4), raw, tmp_path / "other", hierarchy=user_hierarchy(tmp_path), workers=1,
            quiet=True)
    assert {p.stem for p in (tmp_path / "other/val/fine").iterdir()} != val


def test_folder_sixteen_bit_hierarchy(tmp_path):
    """More than 255 classes: 16-bit outputs with ignore 65535, 16-bit raw masks."""
    n = 300
    spec = {"format": "hiposeg-hierarchy/1", "name": "big", "source": "test",
            "levels": [{"name": "leaf", "classes": [{"id": i, "name": f"c{i}", "color": [i % 256, i // 256, 7],
                                                     "parent": f"g{i % 2}", "raw": [1000 + i]} for i in range(n)]},
                       {"name": "group", "classes": [{"id": 0, "name": "g0", "color": [0, 0, 0]},
                                                     {"id": 1, "name": "g1", "color": [9, 9, 9]}]}]}
    (tmp_path / "big.json").write_text(json.dumps(spec))
    raw = tmp_path / "raw"
    mask = blocks(40, 40, [1000 + i for i in range(0, n, 3)], seed=1, dtype=np.uint16)
    write(raw / "train/images/a.png", image(40, 40, 0))
    write(raw / "train/masks/a.png", mask)
    write(raw / "val/images/b.png", image(40, 40, 1))
    write(raw / "val/masks/b.png", mask)
    prepare(Folder(), raw, tmp_path / "out", hierarchy=tmp_path / "big.json", workers=1, quiet=True)
    fine = (mask.astype(np.int64) - 1000).astype(np.uint16)
    check_outputs(tmp_path / "out", "train", "a", fine, (fine % 2).astype(np.uint16))
