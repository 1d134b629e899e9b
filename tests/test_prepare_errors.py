"""Bad input to `hiposeg prepare`, through the CLI: exit code 2, one message that names the file
and the fix, no traceback; `--skip-bad` and `--unknown ignore` instead record the problem."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import fails_with, squash
from hiposeg.cli import app
from hiposeg.hierarchy import builtin_dir


def prep(*args: str | Path) -> list[str | Path]:
    """`hiposeg prepare ARGS` in this process, one worker, no progress bar."""
    return ["prepare", *args, "--workers", "1", "-q"]


@pytest.fixture
def run(cli):
    """`run(*args)` -> (exit code, output) of `hiposeg prepare ARGS` (see `prep`); never a traceback."""

    def invoke(*args: str | Path) -> tuple[int, str]:
        r = cli.invoke(app, [str(a) for a in prep(*args)])
        assert "Traceback" not in r.output, r.output
        return r.exit_code, r.output

    return invoke


def city_tree(raw: Path, n: int = 2, h: int = 16, w: int = 32) -> list[tuple[Path, Path]]:
    pairs = []
    for i in range(n):
        stem = f"ulm_{i:06d}_000019"
        img = raw / "leftImg8bit/val/ulm" / f"{stem}_leftImg8bit.png"
        lab = raw / "gtFine/val/ulm" / f"{stem}_gtFine_labelIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        lab.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img), np.full((h, w, 3), 50, np.uint8))
        cv2.imwrite(str(lab), np.full((h, w), 7, np.uint8))
        pairs.append((img, lab))
    return pairs


@pytest.fixture
def city(tmp_path) -> tuple[Path, list[tuple[Path, Path]]]:
    return tmp_path / "raw", city_tree(tmp_path / "raw")


def two_colours(tmp_path: Path) -> Path:
    """Leaves a (raw 1, red) and b (raw 2, green) under x; raw 0 is ignore."""
    spec = {"format": "hiposeg-hierarchy/1", "name": "two", "source": "test", "raw": {"ignore": [0]},
            "levels": [{"name": "leaf", "classes": [
                {"id": 0, "name": "a", "color": [255, 0, 0], "parent": "x", "raw": [1]},
                {"id": 1, "name": "b", "color": [0, 128, 0], "parent": "x", "raw": [2]}]},
                {"name": "top", "classes": [{"id": 0, "name": "x", "color": [0, 0, 0]}]}]}
    (tmp_path / "two.json").write_text(json.dumps(spec))
    return tmp_path / "two.json"


def folder_raw(raw: Path, stems: dict[str, list[str]], value: int = 1) -> None:
    """RAW/{split}/images/{stem}.png + RAW/{split}/masks/{stem}.png (4x4, every mask pixel `value`)."""
    for split, names in stems.items():
        (raw / split / "images").mkdir(parents=True, exist_ok=True)
        (raw / split / "masks").mkdir(parents=True, exist_ok=True)
        for stem in names:
            cv2.imwrite(str(raw / split / "images" / f"{stem}.png"), np.zeros((4, 4, 3), np.uint8))
            cv2.imwrite(str(raw / split / "masks" / f"{stem}.png"), np.full((4, 4), value, np.uint8))


# ==========================================================================================
# Damaged files, and things that are not files where a file is expected
# ==========================================================================================


def test_size_mismatch(city, tmp_path):
    raw, pairs = city
    cv2.imwrite(str(pairs[0][0]), np.zeros((16, 30, 3), np.uint8))
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), pairs[0][1], "size mismatch", "32x16", "30x16",
               "--skip-bad")


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "truncated"),
    ("empty", "empty file (0 bytes)"),
    ("corrupt", "corrupt PNG"),
    ("not_png", "not a PNG file"),
])
def test_unreadable_labels(city, tmp_path, damage, reason):
    raw, pairs = city
    lab = pairs[0][1]
    data = lab.read_bytes()
    if damage == "truncate":
        lab.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        lab.write_bytes(b"")
    elif damage == "corrupt":  # intact header and IEND, garbage compressed data
        idat = data.index(b"IDAT") + 4
        lab.write_bytes(data[:idat] + bytes(len(data) - idat - 12) + data[-12:])
    else:
        lab.write_bytes(cv2.imencode(".jpg", np.zeros((16, 32), np.uint8))[1].tobytes())
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), lab, reason, "--skip-bad")


def test_unreadable_images(tmp_path):
    raw = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (raw / "images" / split).mkdir(parents=True)
        (raw / "annotations" / split).mkdir(parents=True)
        for k in range(2):
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{k + 1:08d}"
            cv2.imwrite(str(raw / "images" / split / f"{stem}.jpg"), np.full((20, 20, 3), 128, np.uint8))
            cv2.imwrite(str(raw / "annotations" / split / f"{stem}.png"), np.full((20, 20), 3, np.uint8))
    jpgs = sorted(raw.rglob("*.jpg"))
    jpgs[0].write_bytes(b"")
    data = jpgs[1].read_bytes()
    jpgs[1].write_bytes(data[: len(data) - 40])
    # damaged compressed data, structure intact (markers, size, end marker): OpenCV decodes it to
    # grey blocks without an error; it must still be refused
    noisy = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", noisy)
    body = bytearray(buf.tobytes())
    body[len(body) // 3: 2 * len(body) // 3] = bytes(len(body) // 3)
    jpgs[2].write_bytes(bytes(body))
    assert cv2.imread(str(jpgs[2])) is not None  # what a header check + cv2 alone would accept
    out = fails_with(prep("ade20k", raw, "--out", tmp_path / "o"), "3 input files cannot be prepared", jpgs[0],
                     "empty file (0 bytes)", jpgs[1], "truncated or corrupt JPEG", jpgs[2],
                     "corrupt JPEG image (Corrupt JPEG data")
    assert "--skip-bad" in out


@pytest.mark.parametrize("damage, reason", [
    ("truncated", "truncated or corrupt PNG image (no IEND chunk at the end)"),
    ("empty", "empty file (0 bytes)"),
    ("loop", "symlink loop"),
])
def test_unreadable_png_images(city, tmp_path, damage, reason):
    raw, pairs = city
    image = pairs[1][0]
    if damage == "truncated":
        image.write_bytes(image.read_bytes()[:40])
    elif damage == "empty":
        image.write_bytes(b"")
    else:
        image.unlink()
        os.symlink(image, image)  # absolute link to itself
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), "1 input file cannot be prepared", image, reason,
               "--skip-bad")


def test_unusual_but_valid_jpegs_are_accepted(tmp_path):
    """Strict decoding refuses damaged data only: CMYK, grayscale and progressive JPEGs pass the probe."""
    from PIL import Image

    from hiposeg.data.codecs import probe_image

    rgb = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), mode="CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.jpg")
    Image.fromarray(rgb).save(tmp_path / "progressive.jpg", progressive=True)
    data = (tmp_path / "gray.jpg").read_bytes()  # a few padding bytes before the end marker: harmless
    (tmp_path / "padded.jpg").write_bytes(data[:-2] + bytes(10) + data[-2:])
    for name in ("cmyk", "gray", "progressive", "padded"):
        assert probe_image(tmp_path / f"{name}.jpg") == (30, 50), name


def test_jpeg_with_a_broken_huffman_table_is_refused(tmp_path):
    """simplejpeg cannot open it (no strict verdict) and OpenCV cannot decode it: refused, not
    left to crash a data loader worker in the middle of training."""
    from hiposeg.data.codecs import BadFile, probe_image

    data = bytearray(cv2.imencode(".jpg", np.full((32, 32, 3), 90, np.uint8))[1])
    dht = data.index(b"\xff\xc4")
    data[dht + 5: dht + 25] = b"\xff" * 20
    (tmp_path / "dht.jpg").write_bytes(bytes(data))
    with pytest.raises(BadFile, match="corrupt JPEG image .*OpenCV cannot decode it either"):
        probe_image(tmp_path / "dht.jpg")


def test_symlink_loops_in_raw(city, tmp_path):
    raw, pairs = city
    os.rename(raw / "leftImg8bit", raw / "leftImg8bit.real")
    os.symlink(raw / "leftImg8bit", raw / "leftImg8bit")  # points to itself
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), "symlink loop", raw / "leftImg8bit")
    os.unlink(raw / "leftImg8bit")
    os.rename(raw / "leftImg8bit.real", raw / "leftImg8bit")
    pairs[0][1].unlink()
    os.symlink(pairs[0][1], pairs[0][1])  # a label file that links to itself
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), pairs[0][1], "symlink loop")


@pytest.mark.parametrize("which", ["masks", "images"])
def test_a_fifo_among_the_raw_files_is_named_and_does_not_block(tmp_path, which):
    """Opening a FIFO for reading blocks until a writer comes: the run used to hang forever."""
    from faults import run as run_process

    raw, h = tmp_path / "raw", two_colours(tmp_path)
    folder_raw(raw, {"train": ["t0", "t1"], "val": ["v0"]})
    fifo = raw / "train" / which / "t1.png"
    fifo.unlink()
    os.mkfifo(fifo)
    log = tmp_path / "log.txt"
    args = ["prepare", "folder", str(raw), "--hierarchy", str(h), "--out", str(tmp_path / "o"), "--workers", "1", "-q"]
    assert run_process(args, log, timeout=120) == 2, log.read_text()
    text = squash(log.read_text())
    for needle in (fifo, "is a named pipe (FIFO), not a regular file", "--skip-bad"):
        assert squash(str(needle)) in text, (needle, log.read_text())
    assert run_process([*args, "--skip-bad"], log, timeout=120) == 0, log.read_text()
    skipped = json.loads((tmp_path / "o/manifest.json").read_text())["splits"]["train"]["skipped"]
    assert [s["file"] for s in skipped] == [str(fifo)]


def test_skip_bad_lists_the_files_in_the_manifest(tmp_path, run):
    raw = tmp_path / "raw"
    pairs = city_tree(raw, n=3)
    pairs[1][1].write_bytes(pairs[1][1].read_bytes()[:30])  # truncated label
    pairs[2][1].unlink()  # image without label
    code, out = run("cityscapes", raw, "--out", tmp_path / "o", "--skip-bad")
    assert code == 0, out
    m = json.loads((tmp_path / "o/manifest.json").read_text())
    assert m["splits"]["val"]["images"] == 1
    skipped = {x["file"]: x["reason"] for x in m["splits"]["val"]["skipped"]}
    assert set(skipped) == {str(pairs[1][1]), str(pairs[2][0])}
    assert "truncated" in skipped[str(pairs[1][1])] and "missing partner" in skipped[str(pairs[2][0])]
    assert "skipped 2 bad file(s)" in out
    # a rerun with --skip-bad does not retry the unchanged bad file; without the flag both are errors again
    # (files without a partner are reported before any conversion starts)
    code, out = run("cityscapes", raw, "--out", tmp_path / "o", "--skip-bad")
    assert code == 0 and "converted 0 file(s), 2 already done" in " ".join(out.split()), out
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), pairs[2][0], "missing partner")
    pairs[2][0].unlink()
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), pairs[1][1], "truncated")


# ==========================================================================================
# Label maps of the wrong kind; values and colours the hierarchy does not know
# ==========================================================================================


def test_unknown_raw_values_are_listed_with_the_files(city, tmp_path, run):
    raw, pairs = city
    lab = np.full((16, 32), 7, np.uint8)
    lab[:2, :3] = 40
    lab[5, 5] = 200
    cv2.imwrite(str(pairs[1][1]), lab)
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), "40 (6 px)", "200 (1 px)", pairs[1][1],
               "--unknown ignore", "does not know")
    # the suggested fix, rerun in the same folder: the finished file is kept, the other one is mapped
    code, out = run("cityscapes", raw, "--out", tmp_path / "o", "--unknown", "ignore")
    assert code == 0, out
    m = json.loads((tmp_path / "o/manifest.json").read_text())
    assert m["splits"]["val"]["unknown_values"] == {"40": 6, "200": 1}
    fine = cv2.imread(str(tmp_path / "o/val/fine" / "ulm_000001_000019.png"), cv2.IMREAD_UNCHANGED)
    assert (fine[:2, :3] == 255).all() and fine[5, 5] == 255 and fine[10, 10] == 0
    assert "unknown raw values mapped to ignore" in out
    # back to --unknown error: the file with unknown values is checked again and reported
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), "40 (6 px)", pairs[1][1])


def test_sixteen_bit_label_values_beyond_the_hierarchy_are_named(city, tmp_path):
    raw, pairs = city
    lab = np.full((16, 32), 7, np.uint16)
    lab[0, :5] = 40000
    cv2.imwrite(str(pairs[0][1]), lab)
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), "does not know: 40000 (5 px)", pairs[0][1],
               "--unknown ignore")


def test_rgb_label_where_an_index_map_is_expected(city, tmp_path):
    raw, pairs = city
    cv2.imwrite(str(pairs[0][1]), np.full((16, 32, 3), (128, 64, 128), np.uint8))  # a *_color.png in disguise
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), pairs[0][1], "3-channel colour image",
               "single-channel index map", "_gtFine_labelIds.png")


def grey_alpha_png(path: Path, grey: np.ndarray, alpha: np.ndarray) -> Path:
    """A colour-type-4 (grey + alpha) 8-bit PNG (OpenCV cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    h, w = grey.shape
    rows = b"".join(b"\x00" + np.dstack([grey, alpha]).astype(np.uint8)[y].tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 4, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def test_grey_alpha_masks_are_index_maps_when_opaque_and_refused_otherwise(city, tmp_path, run):
    """OpenCV decodes grey+alpha to 4 channels; it used to be reported as a colour image (or, as a
    colour mask, as an unknown colour)."""
    raw, pairs = city
    for _, label in pairs:
        grey_alpha_png(label, np.full((16, 32), 7, np.uint8), np.full((16, 32), 255, np.uint8))
    code, out = run("cityscapes", raw, "--out", tmp_path / "o")
    assert code == 0, out
    fine = cv2.imread(str(tmp_path / "o/val/fine/ulm_000000_000019.png"), cv2.IMREAD_UNCHANGED)
    assert fine.shape == (16, 32) and (fine == 0).all()  # labelId 7 is road, trainId 0
    alpha = np.full((16, 32), 255, np.uint8)
    alpha[0, :3] = 0
    grey_alpha_png(pairs[1][1], np.full((16, 32), 7, np.uint8), alpha)
    out = fails_with(prep("cityscapes", raw, "--out", tmp_path / "o2"), pairs[1][1],
                     "is a grey+alpha PNG with 3 transparent or translucent pixel(s)", "single-channel (grey) PNG")
    assert "colour" not in out
    folder = tmp_path / "folder"
    folder_raw(folder, {"train": ["t0"], "val": ["v0"]})
    grey_alpha_png(folder / "train/masks/t0.png", np.full((4, 4), 2, np.uint8), np.full((4, 4), 255, np.uint8))
    code, out = run("folder", folder, "--hierarchy", two_colours(tmp_path), "--out", tmp_path / "o3")
    assert code == 0, out
    assert (cv2.imread(str(tmp_path / "o3/train/fine/t0.png"), cv2.IMREAD_UNCHANGED) == 1).all()  # raw 2 -> b


def one_class_per_value(tmp_path: Path, top: int) -> Path:
    """Leaves v0..v{top} (raw value v -> id v) under one top class; raw 255 is ignore (as in most releases)."""
    classes = [{"id": v, "name": f"v{v}", "color": [v, v, v], "parent": "all", "raw": [v]} for v in range(top + 1)]
    spec = {"format": "hiposeg-hierarchy/1", "name": "values", "source": "test", "raw": {"ignore": [255]},
            "levels": [{"name": "leaf", "classes": classes},
                       {"name": "top", "classes": [{"id": 0, "name": "all", "color": [0, 0, 0]}]}]}
    (tmp_path / "values.json").write_text(json.dumps(spec))
    return tmp_path / "values.json"


@pytest.mark.parametrize("writer, bit_depth", [("by hand", 1), ("by hand", 2), ("by hand", 4), ("pillow", 1)])
def test_low_bit_depth_grey_masks_are_read_as_their_stored_values(tmp_path, run, writer, bit_depth):
    """libpng widens 1/2/4-bit greyscale to 0..255: a binary mask (PIL mode "1" saves one) read as
    0/255, so with the usual raw ignore value 255 every foreground pixel became ignore in silence;
    2- and 4-bit masks gave "unknown raw values 85/170" (or, for 4-bit 15, ignore again)."""
    from PIL import Image

    from conftest import grey_png_bytes

    top = (1 << bit_depth) - 1
    values = (np.arange(8 * 12).reshape(8, 12) % (top + 1)).astype(np.uint8)
    raw = tmp_path / "raw"
    folder_raw(raw, {"train": ["t0"], "val": ["v0"]})
    for mask in (raw / "train/masks/t0.png", raw / "val/masks/v0.png"):
        cv2.imwrite(str(raw / mask.parent.parent / "images" / mask.name), np.zeros((8, 12, 3), np.uint8))
        if writer == "pillow":
            Image.fromarray(values.astype(bool)).save(mask)
            assert mask.read_bytes()[24:26] == bytes([1, 0])  # IHDR: bit depth 1, greyscale
        else:
            mask.write_bytes(grey_png_bytes(values, bit_depth))
    code, out = run("folder", raw, "--hierarchy", one_class_per_value(tmp_path, top), "--out", tmp_path / "o")
    assert code == 0, out
    for split, stem in (("train", "t0"), ("val", "v0")):
        fine = cv2.imread(str(tmp_path / "o" / split / "fine" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(fine, values), np.unique(fine)
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    assert manifest["splits"]["train"]["pixels"]["ignore"] == 0, manifest["splits"]["train"]


def test_folder_unknown_colour_is_named(tmp_path, run):
    spec = {"format": "hiposeg-hierarchy/1", "name": "two", "source": "test",
            "levels": [{"name": "leaf", "classes": [{"id": 0, "name": "a", "color": [255, 0, 0], "parent": "x"},
                                                    {"id": 1, "name": "b", "color": [0, 255, 0], "parent": "x"}]},
                       {"name": "top", "classes": [{"id": 0, "name": "x", "color": [0, 0, 0]}]}]}
    (tmp_path / "two.json").write_text(json.dumps(spec))
    raw = tmp_path / "raw"
    for split in ("train", "val"):
        (raw / split / "images").mkdir(parents=True)
        (raw / split / "masks").mkdir(parents=True)
        cv2.imwrite(str(raw / split / "images/p.png"), np.zeros((4, 4, 3), np.uint8))
        rgb = np.zeros((4, 4, 3), np.uint8)
        rgb[..., 0] = 255
        rgb[0, 0] = (1, 2, 3)
        cv2.imwrite(str(raw / split / "masks/p.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    fails_with(prep("folder", raw, "--hierarchy", tmp_path / "two.json", "--out", tmp_path / "o"), "rgb(1,2,3) (2 px)",
               raw / "train/masks/p.png", raw / "val/masks/p.png")
    code, out = run("folder", raw, "--hierarchy", tmp_path / "two.json", "--out", tmp_path / "o", "--unknown", "ignore")
    assert code == 0, out
    m = json.loads((tmp_path / "o/manifest.json").read_text())
    assert m["splits"]["train"]["unknown_values"] == {"rgb(1,2,3)": 1}


def test_sixteen_bit_colour_masks_match_and_report_colours_as_stored(tmp_path, run):
    """A 16-bit colour c * 257 is the 8-bit class colour c; any other colour is reported with the
    values in the file (the 8-bit packing used to shift 16-bit values into the next channel)."""
    raw, h = tmp_path / "raw", two_colours(tmp_path)
    folder_raw(raw, {"train": ["t0"], "val": ["v0"]})
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[:2] = (255 * 257, 0, 0)  # class a
    rgb[2:] = (0, 128 * 257, 0)  # class b
    rgb[3, 3] = (0, 300, 0)  # no class: stored as (0, 300, 0)
    for split, stem in (("train", "t0"), ("val", "v0")):
        cv2.imwrite(str(raw / split / "masks" / f"{stem}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    fails_with(prep("folder", raw, "--hierarchy", h, "--out", tmp_path / "o"), "rgb(0,300,0) (2 px)",
               raw / "train/masks/t0.png")
    code, out = run("folder", raw, "--hierarchy", h, "--out", tmp_path / "o", "--unknown", "ignore")
    assert code == 0, out
    fine = cv2.imread(str(tmp_path / "o/train/fine/t0.png"), cv2.IMREAD_UNCHANGED)
    expected = np.array([[0] * 4, [0] * 4, [1] * 4, [1, 1, 1, 255]], np.uint8)
    np.testing.assert_array_equal(fine, expected)
    m = json.loads((tmp_path / "o/manifest.json").read_text())
    assert m["splits"]["train"]["unknown_values"] == {"rgb(0,300,0)": 1}


# ==========================================================================================
# Layouts: missing or ambiguous folders, pairing by stem, release configs
# ==========================================================================================


def test_empty_or_wrong_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    fails_with(prep("cityscapes", tmp_path / "empty", "--out", tmp_path / "o"), "no Cityscapes release in",
               "leftImg8bit/{train,val}/CITY/*_leftImg8bit.png", "found: (empty)")
    city_tree(tmp_path / "half")
    shutil.rmtree(tmp_path / "half/gtFine")
    fails_with(prep("cityscapes", tmp_path / "half", "--out", tmp_path / "o"), tmp_path / "half/gtFine", "is missing",
               "gtFine_trainvaltest.zip")
    fails_with(prep("cityscapes", tmp_path / "nope", "--out", tmp_path / "o"), "raw release folder not found",
               tmp_path / "nope")
    fails_with(prep("ade20k", tmp_path / "empty", "--out", tmp_path / "o"), "no ADE20K SceneParsing release",
               "RAW/images/{training,validation}/*.jpg")
    fails_with(prep("pascal-part", tmp_path / "empty", "--out", tmp_path / "o"), "no PASCAL-Part-108 release",
               "(a) the GMNet release", "(b) RAW/img_dir/{train,val}/*.jpg + RAW/ann108_dir/{train,val}/*.png")
    fails_with(prep("folder", tmp_path / "empty", "--hierarchy", "cityscapes", "--out", tmp_path / "o"),
               "no images/masks folders", "RAW/images/* + RAW/masks/*.png")


def test_missing_partner(city, tmp_path):
    raw, pairs = city
    pairs[1][1].unlink()
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o"), pairs[1][0], "missing partner",
               "ulm_000001_000019_gtFine_labelIds.png", "--skip-bad")


def test_names_that_could_never_be_prepared_are_refused_before_any_work(tmp_path, run):
    """A split folder named like a dataset's own top-level files, or a stem so long that the temp name
    hiposeg writes first (14 bytes longer) passes the 255-byte limit of a file name, used to fail
    midway ("Is a directory", "File name too long") with the hint "rerun the same command to
    resume", which could never succeed."""
    h = two_colours(tmp_path)
    for split in ("manifest.json", "hierarchy.json"):
        raw = tmp_path / f"raw-{split}"
        folder_raw(raw, {"train": ["t0"], split: ["v0"]})
        fails_with(prep("folder", raw, "--hierarchy", h, "--out", tmp_path / "o"), raw / split / "images/v0.png",
                   f"split {split!r} has the name of a file hiposeg keeps beside the split folders", "can never be",
                   "Rename the file or folder in RAW")
        assert not (tmp_path / "o").exists()
    for stem, size in (("x" * 241, 245), ("é" * 119, 242)):  # legal names; "é" is 2 bytes in UTF-8
        raw = tmp_path / f"raw-{size}"
        folder_raw(raw, {"train": ["t0", stem], "val": ["v0"]})
        fails_with(prep("folder", raw, "--hierarchy", h, "--out", tmp_path / "o"), raw / "train/images" / f"{stem}.png",
                   f"would be {size} bytes long", "through a temp name 14 bytes longer", "255-byte limit",
                   "Rename the file: a name (without its extension) of at most 237 bytes")
        assert not (tmp_path / "o").exists()
    raw = tmp_path / "raw-fits"
    folder_raw(raw, {"train": ["t0", "x" * 237], "val": ["v0"]})  # its temp names are exactly 255 bytes
    code, out = run("folder", raw, "--hierarchy", h, "--out", tmp_path / "o")
    assert code == 0, out
    assert (tmp_path / "o/train/fine" / ("x" * 237 + ".png")).is_file()


def test_two_images_with_one_stem_are_an_error_naming_both(tmp_path):
    raw, h = tmp_path / "raw", two_colours(tmp_path)
    folder_raw(raw, {"train": ["t0", "t1"], "val": ["v0"]})
    cv2.imwrite(str(raw / "train/images/t0.jpg"), np.zeros((4, 4, 3), np.uint8))
    fails_with(prep("folder", raw, "--hierarchy", h, "--out", tmp_path / "o"), "two files with the stem 't0'",
               raw / "train/images/t0.jpg", raw / "train/images/t0.png", "Remove or rename one of them")
    assert not (tmp_path / "o").exists()
    city = tmp_path / "city"  # the same Cityscapes frame in two city folders
    pairs = city_tree(city, n=1)
    (pairs[0][0].parent.parent / "ulm_copy").mkdir()
    shutil.copy(pairs[0][0], pairs[0][0].parent.parent / "ulm_copy")
    fails_with(prep("cityscapes", city, "--out", tmp_path / "o"), "two files with the stem 'ulm_000000_000019'",
               pairs[0][0], city / "leftImg8bit/val/ulm_copy/ulm_000000_000019_leftImg8bit.png")


def test_an_image_renamed_in_raw_leaves_no_stale_image_behind(tmp_path, run):
    """t0.jpg becomes t0.png between two runs: the rerun redoes t0 and removes its old image link,
    so the prepared split holds one image per stem (a loader pairing by stem cannot pick the stale one)."""
    raw, h = tmp_path / "raw", two_colours(tmp_path)
    folder_raw(raw, {"train": ["t1"], "val": ["v0"]})
    cv2.imwrite(str(raw / "train/images/t0.jpg"), np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(str(raw / "train/masks/t0.png"), np.full((4, 4), 2, np.uint8))
    for _ in range(2):
        code, out = run("folder", raw, "--hierarchy", h, "--out", tmp_path / "o")
        assert code == 0, out
        (raw / "train/images/t0.jpg").unlink(missing_ok=True)
        cv2.imwrite(str(raw / "train/images/t0.png"), np.zeros((4, 4, 3), np.uint8))
    images = tmp_path / "o/train/images"
    assert sorted(p.name for p in images.iterdir()) == ["t0.png", "t1.png"]
    assert os.readlink(images / "t0.png") == str(raw / "train/images/t0.png")


def test_pascal_part_ambiguous_folders_are_named(tmp_path, run):
    raw = tmp_path / "gmnet"
    for variant in ("parts_a", "parts_b"):  # two label folders, neither says 108
        (raw / variant).mkdir(parents=True)
        cv2.imwrite(str(raw / variant / "2008_000045.png"), np.full((8, 8), 3, np.uint8))
    (raw / "JPEGImages").mkdir()
    cv2.imwrite(str(raw / "JPEGImages/2008_000045.jpg"), np.zeros((8, 8, 3), np.uint8))
    (raw / "train.txt").write_text("2008_000045\n")
    fails_with(prep("pascal-part", raw, "--out", tmp_path / "o"), "several folders under", "parts_a, parts_b",
               "--labels DIR")
    code, out = run("pascal-part", raw, "--out", tmp_path / "o", "--labels", "parts_b")
    assert code == 0, out
    assert "missing splits (not in RAW): val" in out
    m = json.loads((tmp_path / "o/manifest.json").read_text())
    assert m["options"] == {**m["options"], "layout": "gmnet", "labels": "parts_b", "images": "JPEGImages", "lists": "."}


def _mapillary(raw: Path, write_palette_png) -> list[dict]:
    spec = json.loads((builtin_dir() / "mapillary_v2.json").read_text())
    labels = [{"name": c["name"], "readable": c["name"], "color": c["color"], "evaluate": c.get("evaluate", True)}
              for c in sorted(spec["levels"][0]["classes"], key=lambda c: c["id"])]
    (raw / "validation/images").mkdir(parents=True)
    cv2.imwrite(str(raw / "validation/images/key.jpg"), np.zeros((8, 8, 3), np.uint8))
    write_palette_png(raw / "validation/v2.0/labels/key.png", np.full((8, 8), 27, np.uint8), np.zeros((256, 3)))
    (raw / "config_v2.0.json").write_text(json.dumps({"labels": labels}))
    return labels


def test_mapillary_config_and_version_checks(tmp_path, write_palette_png, run):
    raw = tmp_path / "vistas"
    labels = _mapillary(raw, write_palette_png)
    code, out = run("mapillary", raw, "--out", tmp_path / "ok")
    assert code == 0, out
    swapped = labels.copy()
    swapped[21], swapped[24] = swapped[24], swapped[21]
    (raw / "config_v2.0.json").write_text(json.dumps({"labels": swapped}))
    fails_with(prep("mapillary", raw, "--out", tmp_path / "o"), raw / "config_v2.0.json", "does not match hierarchy",
               "label 21 is 'construction--flat--sidewalk' in the config but 'construction--flat--road'")
    (raw / "config_v2.0.json").write_text(json.dumps({"labels": labels[:66]}))
    fails_with(prep("mapillary", raw, "--out", tmp_path / "o"), "the hierarchy maps raw values [66, 67",
               "(66 labels) does not have")
    (raw / "config_v2.0.json").unlink()
    fails_with(prep("mapillary", raw, "--out", tmp_path / "o"), raw / "config_v2.0.json", "not found")
    v12 = tmp_path / "v12"  # a v1.2 download is read as v1.2: its own config is checked
    (v12 / "training/v1.2/labels").mkdir(parents=True)
    (v12 / "training/images").mkdir(parents=True)
    (v12 / "config_v1.2.json").write_text("{}")
    fails_with(prep("mapillary", v12, "--out", tmp_path / "o"), v12 / "config_v1.2.json", "is not a Mapillary config")
    (v12 / "config_v1.2.json").write_text(json.dumps({"labels": labels}))  # v2.0's 124 labels in a v1.2 tree
    fails_with(prep("mapillary", v12, "--out", tmp_path / "o"), "does not match hierarchy 'mapillary_v1.2'",
               "label 2 is 'construction--barrier--ambiguous' in the config but 'construction--barrier--curb'",
               "Vistas v1.2 release (66 labels, hierarchy mapillary_v1.2)")


def test_a_fifo_as_a_split_list_or_release_config_is_named(tmp_path, write_palette_png):
    """Not taken for a missing file (a missing split, "not found"), and never opened (run in a
    process of its own with a time limit: opening it would block forever)."""
    from faults import run as run_process

    raw = tmp_path / "gmnet"
    (raw / "label108").mkdir(parents=True)
    cv2.imwrite(str(raw / "label108/2008_000045.png"), np.full((8, 8), 3, np.uint8))
    (raw / "JPEGImages").mkdir()
    cv2.imwrite(str(raw / "JPEGImages/2008_000045.jpg"), np.zeros((8, 8, 3), np.uint8))
    (raw / "val.txt").write_text("2008_000045\n")
    os.mkfifo(raw / "train.txt")
    vistas = tmp_path / "vistas"
    _mapillary(vistas, write_palette_png)
    (vistas / "config_v2.0.json").unlink()
    os.mkfifo(vistas / "config_v2.0.json")
    for source, release, fifo in (("pascal-part", raw, raw / "train.txt"),
                                  ("mapillary", vistas, vistas / "config_v2.0.json")):
        log = tmp_path / f"{source}.log"
        args = ["prepare", source, str(release), "--out", str(tmp_path / source), "--workers", "1", "-q"]
        assert run_process(args, log, timeout=120) == 2, log.read_text()
        for needle in (fifo, "is a named pipe (FIFO)"):
            assert squash(str(needle)) in squash(log.read_text()), (needle, log.read_text())


def test_deeply_nested_json_in_the_output_folder_or_a_release_is_one_clear_error(tmp_path, write_palette_png):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    raw, _ = tmp_path / "raw", city_tree(tmp_path / "raw")
    for extra in ((), ("--overwrite",)):
        fails_with(prep("cityscapes", raw, "--out", out, *extra), "holds no hiposeg prepared dataset",
                   f"({out / 'manifest.json'} nests its values too deeply")
    fails_with(["prepare", "synthetic", "--out", out, "--overwrite", "-q"], "nests its values too deeply")
    vistas = tmp_path / "vistas"
    _mapillary(vistas, write_palette_png)
    (vistas / "config_v2.0.json").write_text('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    fails_with(prep("mapillary", vistas, "--out", tmp_path / "m"), vistas / "config_v2.0.json",
               "nests its values too deeply")


# ==========================================================================================
# Flags and the printed summary
# ==========================================================================================


def test_bad_flag_values(city, tmp_path):
    raw, _ = city
    fails_with(["prepare", "cityscapes", raw, "--unknown", "drop"], "Invalid value for '--unknown'", "'drop'")
    fails_with(["prepare", "cityscapes", raw, "--workers", "0"], "Invalid value for '--workers'")
    fails_with(prep("cityscapes", raw, "--out", tmp_path / "o", "--hierarchy", tmp_path / "missing.json"),
               "hierarchy file not found", tmp_path / "missing.json")


def test_names_with_rich_markup_are_printed_as_text(tmp_path, run):
    """A split folder `[bold]`, a file `[b].png` skipped as bad and an --out `o[/c]` (folder `o[`,
    then `c]`): the summary prints them as written (the closing tag used to end in a MarkupError
    traceback, the others were eaten as styles)."""
    raw, h = tmp_path / "raw", two_colours(tmp_path)
    folder_raw(raw, {"[bold]": ["t0", "[b]"], "val": ["v0"]})
    (raw / "[bold]/masks/[b].png").write_bytes(b"")
    out_dir = tmp_path / "o[" / "c]"
    code, out = run("folder", raw, "--hierarchy", h, "--out", out_dir, "--skip-bad")
    assert code == 0, out
    text = squash(out)
    for needle in ("│[bold]│", str(raw / "[bold]/masks/[b].png") + ":emptyfile", f"datasetready:{out_dir}"):
        assert squash(needle) in text, (needle, out)
