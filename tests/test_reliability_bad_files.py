"""Reliability: bad files reach the user as one clear message (file, value, fix) with exit code 2.

Bad input to `hiposeg prepare` is tested in tests/test_prepare_errors.py. This file has the same
faults arriving *after* `prepare`: at training time (inside DataLoader worker processes) and when
scoring predictions, and a split the raw release did not have.
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
# a split the raw release did not have
# ------------------------------------------------------------------------------------------


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


def test_one_bit_prediction_files_are_scored_as_their_stored_values(tiny, tmp_path):
    """A binary prediction saved as a 1-bit PNG (PIL mode "1") scores exactly like the same classes
    0/1 saved as 8-bit; libpng's widening to 0/255 used to score class 1 as "outside the classes"."""
    from PIL import Image

    from hiposeg.evaluate import evaluate_predictions

    reports = {}
    for bits in (8, 1):
        preds = tmp_path / f"preds{bits}"
        preds.mkdir()
        for gt in sorted((tiny / "val" / "fine").iterdir()):
            binary = cv2.imread(str(gt), cv2.IMREAD_UNCHANGED) == 1
            if bits == 8:
                cv2.imwrite(str(preds / gt.name), binary.astype(np.uint8))
            else:
                Image.fromarray(binary).save(preds / gt.name)
        reports[bits] = evaluate_predictions(preds, tiny, "val")["levels"]
    assert sorted(v for v in reports[8]["fine"]["IoU"].values() if v)[-1] == 100.0  # class 1 is scored
    assert reports[1] == reports[8], (reports[1]["fine"], reports[8]["fine"])


@pytest.mark.parametrize("which, needles", [
    ("manifest.json", ["is a named pipe (FIFO), not a regular file"]),
    ("hierarchy.json", ["is a named pipe (FIFO), not a regular file"]),
    ("val/images", ["cannot read image", "is a named pipe (FIFO), not a regular file"]),
    ("val/fine", ["cannot read label map", "is a named pipe (FIFO), not a regular file"]),
    (".prepare-journal.jsonl", ["did not finish (no manifest.json yet)"]),
])
def test_a_fifo_in_a_prepared_dataset_is_named_and_never_blocks(tiny, exported_models, tmp_path, which, needles):
    """Opening a FIFO for reading waits for a writer: `eval` (and `train`) hung forever on one in a
    prepared dataset. Run in a process of its own with a time limit; a model's evaluation reads the
    images, `eval --predictions` the rest."""
    data, preds = tmp_path / "data", tmp_path / "preds"
    shutil.copytree(tiny, data)
    shutil.copytree(tiny / "val" / "fine", preds)
    victim = data / which if "." in which else sorted((data / which).iterdir())[0]
    if which == ".prepare-journal.jsonl":
        (data / "manifest.json").unlink()  # an unfinished `prepare`: its journal names the command
    victim.unlink()
    os.mkfifo(victim)
    log = tmp_path / "log.txt"
    scored = ["--predictions", str(preds)] if which != "val/images" else \
        [str(exported_models["hiposeg"]), "--device", "cpu", "--workers", "0"]
    assert run(["eval", *scored, "--data", str(data)], log, timeout=60) == 2, log.read_text()
    text = squash(log.read_text())
    assert "Traceback" not in text, log.read_text()
    for needle in (*needles, data if which == ".prepare-journal.jsonl" else victim):
        assert squash(str(needle)) in text, (needle, log.read_text())


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
