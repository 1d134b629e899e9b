"""Reliability: bad files reach the user as one clear message (file, value, fix) with exit code 2.

tests/test_prepare_errors.py already covers, for `hiposeg prepare`: truncated / corrupt / empty /
non-PNG label files, empty and truncated JPEG images, unknown (out-of-range) 8-bit label values,
an RGB label where an index map is expected, image/label size mismatches, missing partners and
symlink loops in RAW's folders and label files. This file adds the cases it does not have, and the
same faults arriving *after* `prepare`: at training time (inside DataLoader worker processes) and
when scoring predictions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import fails_with, squash
from faults import make_tiny_data, one_thread, run, train_args  # noqa: F401
from hiposeg.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def city(tmp_path) -> tuple[Path, list[tuple[Path, Path]]]:
    from test_prepare_errors import city_tree

    return tmp_path / "raw", city_tree(tmp_path / "raw")


def prepare_args(raw: Path, out: Path) -> list:
    return ["prepare", "cityscapes", raw, "--out", out, "--workers", "1", "-q"]


# ------------------------------------------------------------------------------------------
# prepare: the cases tests/test_prepare_errors.py does not have
# ------------------------------------------------------------------------------------------


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
    fails_with(prepare_args(raw, tmp_path / "o"), "1 input file cannot be prepared", image, reason, "--skip-bad")


def test_sixteen_bit_label_values_beyond_the_hierarchy_are_named(city, tmp_path):
    raw, pairs = city
    lab = np.full((16, 32), 7, np.uint16)
    lab[0, :5] = 40000
    cv2.imwrite(str(pairs[0][1]), lab)
    fails_with(prepare_args(raw, tmp_path / "o"), "does not know: 40000 (5 px)", pairs[0][1], "--unknown ignore")


def test_missing_split_is_named_when_training_and_scoring(city, tmp_path):
    raw, _ = city  # the tree holds only the val split
    out = tmp_path / "prepared"
    r = runner.invoke(app, [str(a) for a in prepare_args(raw, out)])
    assert r.exit_code == 0 and "missing splits (not in RAW): train" in r.output, r.output
    fails_with(["train", "--data", out, "--out", tmp_path / "run", "--quiet", "--device", "cpu"],
               f"{out} has no split 'train' (the raw release did not contain it); it has: val",
               f"hiposeg prepare cityscapes {raw.resolve()} --out {out}")
    fails_with(["eval", "--predictions", tmp_path, "--data", out, "--split", "test"], "has no split 'test'",
               "Use one of those splits")


# ------------------------------------------------------------------------------------------
# after prepare: files that break or disappear before training / scoring
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("bad") / "synthetic")


@pytest.mark.slow
def test_moved_raw_files_reach_the_user_from_a_loader_worker_process(tiny, tmp_path):
    """End to end, `python -m hiposeg train --workers 1`: the images are links into a raw folder
    that was moved after preparing; the worker's UserError is shown as the one message."""
    data, moved = tmp_path / "data", tmp_path / "raw-images"
    shutil.copytree(tiny, data)
    moved.mkdir()
    for img in sorted((data / "train" / "images").iterdir()):
        img.rename(moved / img.name)
        img.symlink_to(moved / img.name)
    shutil.rmtree(moved)  # the raw release moved away
    log = tmp_path / "log.txt"
    code = run(train_args(data, tmp_path / "run", "--workers", "1", iters=2), log)
    out = log.read_text()
    assert code == 2, out
    for bad in ("Traceback", "DataLoader worker", "Caught UserError"):
        assert bad not in out, out
    for needle in (f"cannot read image {data / 'train' / 'images'}", f"(a link to {moved}/",
                   "was the raw release moved?", "Prepare the dataset again"):
        assert squash(needle) in squash(out), (needle, out)


def corrupt_png_body(path: Path) -> None:
    """Header and IEND intact, compressed data zeroed: passes a header/trailer probe, fails decoding."""
    data = path.read_bytes()
    start = data.index(b"IDAT") + 4
    path.write_bytes(data[:start] + bytes(len(data) - start - 12) + data[-12:])


@pytest.mark.parametrize("level, damage, needles", [
    ("fine", lambda p: p.write_bytes(p.read_bytes()[:60]), ["cannot read label map", "truncated",
                                                            "Prepare the dataset again"]),
    ("images", corrupt_png_body, ["cannot read image", "Prepare the dataset again"]),
])
def test_files_damaged_after_prepare_stop_training_with_the_file_named(tiny, tmp_path, level, damage, needles):
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    for p in (data / "train" / level).iterdir():
        damage(p)
    out = fails_with(train_args(data, tmp_path / "run", "--workers", "1", iters=2), *needles)
    assert str(data / "train" / level) in squash(out)


@pytest.mark.parametrize("damage, needles", [
    ("missing", ["1 of 4 predictions are missing", "{stem}.png"]),
    ("rgb", ["has 3 channels", "single-channel map of fine class ids"]),
    ("size", ["is 32x64 but the label is 64x64", "full resolution"]),
    ("truncated", ["cannot read label map", "truncated"]),
])
def test_bad_prediction_files_are_named(tiny, tmp_path, damage, needles):
    preds = tmp_path / "preds"
    shutil.copytree(tiny / "val" / "fine", preds)
    victim = sorted(preds.iterdir())[1]
    if damage == "missing":
        victim.unlink()
    elif damage == "rgb":
        cv2.imwrite(str(victim), np.zeros((64, 64, 3), np.uint8))
    elif damage == "size":
        cv2.imwrite(str(victim), np.zeros((64, 32), np.uint8))
    else:
        victim.write_bytes(victim.read_bytes()[:50])
    out = fails_with(["eval", "--predictions", preds, "--data", tiny], *needles)
    assert squash(victim.name if damage == "missing" else str(victim)) in squash(out)


# ------------------------------------------------------------------------------------------
# Label values that are neither a class nor ignore, after prepare
# ------------------------------------------------------------------------------------------


def spoil(label: Path, value: int) -> int:
    """Set the top half of a label map to `value`; returns the number of pixels changed."""
    lab = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    lab[: lab.shape[0] // 2] = value
    cv2.imwrite(str(label), lab)
    return lab[: lab.shape[0] // 2].size


def test_invalid_ground_truth_is_an_error_in_both_eval_modes_or_counted_when_asked(tiny, tiny_run, tmp_path):
    """The issue's case: half an image set to an invalid value still scored 100.00 against perfect predictions."""
    data, preds = tmp_path / "data", tmp_path / "preds"
    shutil.copytree(tiny, data)
    shutil.copytree(tiny / "val" / "fine", preds)  # perfect predictions of the true labels
    victim = sorted((data / "val" / "fine").iterdir())[1]
    n = spoil(victim, 200)
    needles = ["ground truth holds values that are neither a class (0..14) nor the ignore value 255",
               f"{victim}: 200 ({n:,} px)", "--invalid-gt ignore"]
    fails_with(["eval", "--predictions", preds, "--data", data], *needles)
    _, run = tiny_run
    fails_with(["eval", run, "--data", data, "--device", "cpu", "--workers", "0", "--mode", "whole",
                "--report", tmp_path / "model.json"], *needles)
    assert not (tmp_path / "model.json").exists()
    r = runner.invoke(app, ["eval", "--predictions", str(preds), "--data", str(data), "--invalid-gt", "ignore",
                            "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert squash(f"warning: {n:,} ground-truth pixels in 1 file(s) hold values") in squash(r.output), r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["invalid_ground_truth"] == {"pixels": n, "values": {"200": n}, "files": {str(victim): {"200": n}}}
    assert rep["levels"]["fine"]["pixels"] == 4 * 64 * 64 - n - sum(  # the invalid pixels are scored nowhere
        int((cv2.imread(str(p), cv2.IMREAD_UNCHANGED) == 255).sum()) for p in (data / "val" / "fine").iterdir())
    assert rep["levels"]["fine"]["mIoU"] == 100.0
    fails_with(["eval", "--predictions", preds, "--data", data, "--invalid-gt", "skip"], "--invalid-gt 'skip'")


def test_out_of_range_training_labels_stop_training_naming_the_file_from_a_loader_worker(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    victim = sorted((data / "train" / "fine").iterdir())[5]
    n = spoil(victim, 77)
    fails_with(train_args(data, tmp_path / "run", "--workers", "1", iters=6),
               f"label map {victim} holds values that are neither a class (0..14) nor the ignore value 255: "
               f"77 ({n:,} px)", "prepare the dataset again")
