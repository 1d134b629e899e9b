"""Reliability: outputs that would destroy data, and outputs that cannot be written.

`predict` and `eval --save-predictions` never write into a prepared dataset (its label maps are the
ground truth), nor over the input images, nor into a non-empty folder unless `--overwrite`.
`eval --report` never replaces a file that is not a hiposeg report (unless `--overwrite`).
A read-only or full output is found before the long work (a probe write), and a write that fails
later is one clear error; a report that cannot be written after a finished evaluation still shows
the evaluation. Read-only and full disks are simulated (tests/faults.py): the tests run as root.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import fails_with, squash
from faults import install_full_disk, install_read_only, one_thread, temp_files, train_args  # noqa: F401
from hiposeg.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run's prepared dataset (a failing test must not damage the shared one)."""
    src, _ = tiny_run
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        cv2.imwrite(str(folder / f"{name}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return folder


def predict_args(run: Path, inputs: list, out: Path, *extra: str) -> list:
    return ["predict", run, *inputs, "--out", out, "--device", "cpu", "--workers", "0", "--mode", "whole", "-q",
            *extra]


def eval_args(run: Path, data: Path, *extra) -> list:
    return ["eval", run, "--data", data, "--device", "cpu", "--workers", "0", "--mode", "whole", *extra]


# ------------------------------------------------------------------------------------------
# Never over data
# ------------------------------------------------------------------------------------------


def test_predict_never_writes_into_a_prepared_dataset_and_eval_still_scores_the_true_labels(tiny_run, data, tmp_path):
    """The issue's case: `predict RUN DATA/val/images --out DATA/val` replaced the ground truth."""
    _, run = tiny_run
    ref = tmp_path / "ref.json"
    assert runner.invoke(app, [str(a) for a in eval_args(run, data, "--report", ref)]).exit_code == 0
    before = digest(data)
    link = tmp_path / "link"
    link.symlink_to(data / "val")
    sneaky = tmp_path / "sneaky"  # an empty --out whose fine/ is a link into the dataset
    sneaky.mkdir()
    (sneaky / "fine").symlink_to(data / "val" / "fine")
    for out, extra in [(data / "val", ()), (data, ()), (data / "val" / "fine" / "new", ()), (link, ()),
                       (sneaky, ("--overwrite",))]:
        fails_with(predict_args(run, [data / "val" / "images"], out, *extra), "is inside the prepared dataset",
                   "hiposeg never writes into a prepared dataset")
    fails_with(eval_args(run, data, "--save-predictions", data / "val" / "fine"), "--save-predictions",
               "is inside the prepared dataset")
    assert digest(data) == before
    r = runner.invoke(app, [str(a) for a in eval_args(run, data, "--report", tmp_path / "after.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "after.json").read_text())["levels"] == json.loads(ref.read_text())["levels"]


def test_predict_refuses_a_non_empty_out_unless_overwrite_and_never_an_out_holding_its_inputs(tiny_run, photos,
                                                                                             tmp_path):
    _, run = tiny_run
    out = tmp_path / "preds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails_with(predict_args(run, [photos], out), f"--out {out} is not empty (1 entry: notes.txt)", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    r = runner.invoke(app, [str(a) for a in predict_args(run, [photos], out, "--overwrite")])
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine" and len(list((out / "fine").iterdir())) == 3
    # predictions inside the input folder: the first run is fine, the next would read (and could
    # overwrite) its own outputs as inputs
    inner = photos / "preds"
    assert runner.invoke(app, [str(a) for a in predict_args(run, [photos], inner)]).exit_code == 0
    before = digest(photos)
    fails_with(predict_args(run, [photos], inner, "--overwrite"), f"--out {inner} contains the input image",
               "outside the input folders")
    fails_with(predict_args(run, [photos / "a.png"], photos, "--overwrite"), f"--out {photos} contains the input "
               f"image {photos / 'a.png'}")
    assert digest(photos) == before


def test_eval_report_never_replaces_a_file_that_is_not_a_report(tiny_run, data, tmp_path):
    _, run = tiny_run
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    fails_with(eval_args(run, data, "--report", notes), f"--report {notes} exists and is not a hiposeg report",
               "--overwrite")
    assert notes.read_text() == "my notes"
    manifest = (data / "manifest.json").read_bytes()
    fails_with(eval_args(run, data, "--report", data / "manifest.json", "--overwrite"), "is inside the prepared dataset")
    assert (data / "manifest.json").read_bytes() == manifest
    fails_with(eval_args(run, data, "--report", tmp_path), f"--report {tmp_path} is a folder")
    report = tmp_path / "r.json"  # a hiposeg report is replaced by the next evaluation
    for _ in range(2):
        assert runner.invoke(app, [str(a) for a in eval_args(run, data, "--report", report)]).exit_code == 0
    assert runner.invoke(app, [str(a) for a in eval_args(run, data, "--report", notes, "--overwrite")]).exit_code == 0
    assert json.loads(notes.read_text())["levels"] == json.loads(report.read_text())["levels"]


# ------------------------------------------------------------------------------------------
# Read-only and full outputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("err, words", [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied"),
                                       (errno.ENOSPC, "No space left on device")])
def test_unwritable_outputs_are_refused_before_the_work(tiny_run, data, photos, tmp_path, monkeypatch, err, words):
    import hiposeg.engine as engine
    import hiposeg.evaluate as evaluate
    import hiposeg.predict as predict

    _, run = tiny_run
    ro = tmp_path / "ro"
    ro.mkdir()
    started = []
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: started.append("eval"))
    monkeypatch.setattr(evaluate, "evaluate_predictions", lambda *a, **k: started.append("eval"))
    monkeypatch.setattr(engine, "train", lambda *a, **k: started.append("train"))
    monkeypatch.setattr(predict, "predict_logits", lambda *a, **k: started.append("predict"))
    if err == errno.ENOSPC:  # a full disk: new files can be created, but no byte can be written
        install_full_disk(monkeypatch, "*", budget=0, root=ro)
    else:
        install_read_only(monkeypatch, ro, err)
    cases = [
        (eval_args(run, data, "--report", ro / "r.json"), f"cannot write to the folder of --report {ro}: {words}"),
        (eval_args(run, data, "--save-predictions", ro / "p"), f"cannot write to --save-predictions {ro / 'p'}: {words}"),
        (["eval", "--predictions", data / "val" / "fine", "--data", data, "--report", ro / "r.json"],
         f"cannot write to the folder of --report {ro}: {words}"),
        (predict_args(run, [photos], ro / "preds"), f"cannot write to --out folder {ro / 'preds' / 'fine'}: {words}"),
        (train_args(data, ro / "run", iters=2), f"run directory {ro / 'run'}: {words}"),
    ]
    for args, needle in cases:
        fails_with(args, needle)
    monkeypatch.undo()
    assert started == [] and not [p for p in ro.rglob("*") if p.is_file() and p.name != ".hiposeg.lock"]


def test_a_report_that_cannot_be_written_after_the_evaluation_still_shows_it(tiny_run, data, tmp_path, monkeypatch):
    _, run = tiny_run
    report = tmp_path / "report.json"
    seen = install_full_disk(monkeypatch, "report.json", budget=0)
    r = runner.invoke(app, [str(a) for a in eval_args(run, data, "--report", report)])
    monkeypatch.undo()
    assert seen["failed"] == 1
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    text = squash(r.output)
    for needle in (f"could not write the report {report}: No space left on device", "The evaluation finished",
                   "mIoU per hierarchy level"):
        assert squash(needle) in text, (needle, r.output)
    shown = json.loads(r.output[r.output.index("\n{") + 1: r.output.rindex("}") + 1])
    ok = tmp_path / "ok.json"
    assert runner.invoke(app, [str(a) for a in eval_args(run, data, "--report", ok)]).exit_code == 0
    assert shown["levels"] == json.loads(ok.read_text())["levels"]
    assert not report.exists() and not temp_files(tmp_path)


def test_a_full_disk_while_predicting_or_saving_predictions_is_one_clear_error(tiny_run, data, photos, tmp_path,
                                                                              monkeypatch):
    _, run = tiny_run
    out = tmp_path / "preds"
    seen = install_full_disk(monkeypatch, "*.png", budget=0, nth=4)  # after fine, coarse, overlay of a: b's fine map
    r = runner.invoke(app, [str(a) for a in predict_args(run, [photos], out)])
    monkeypatch.undo()
    assert seen["failed"] >= 1
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert squash(f"could not write {out / 'fine'}/") in squash(r.output)
    assert "No space left on device" in r.output and not temp_files(out / "fine")
    saved = tmp_path / "saved"
    seen = install_full_disk(monkeypatch, "*.png", budget=0, nth=2)
    r = runner.invoke(app, [str(a) for a in eval_args(run, data, "--save-predictions", saved)])
    monkeypatch.undo()
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert squash(f"could not write prediction {saved}/") in squash(r.output) and "No space left" in r.output


@pytest.mark.parametrize("linked", ["fine", "overlay"])
def test_predict_never_writes_over_its_inputs_through_a_link_inside_out(tiny_run, photos, tmp_path, linked):
    """OUT/fine (or OUT/overlay) as a link to the input folder: the label maps would replace the photos
    of the same names. The folders predict writes are checked after resolving links, even with --overwrite."""
    _, run = tiny_run
    out = tmp_path / "out"
    out.mkdir()
    (out / linked).symlink_to(photos, target_is_directory=True)
    before = digest(photos)
    fails_with(predict_args(run, [photos], out, "--overwrite"),
               f"--out {out / linked} (a link to {photos}) contains the input image {photos / 'a.png'}")
    assert digest(photos) == before and sorted(p.name for p in out.iterdir()) == [linked]


def test_eval_save_predictions_never_writes_over_the_images_or_the_raw_files_they_link_to(exported_models, tiny_run,
                                                                                          tmp_path):
    """A dataset prepared from a raw folder links its images to the raw files: `--save-predictions
    RAW/val/images` (or the dataset's own images, or a link to the raw folder) would write label maps
    over them. Refused even with --overwrite; raw data is never modified."""
    data, _ = tiny_run
    raw, prepared, link = tmp_path / "raw", tmp_path / "prepared", tmp_path / "link"
    for split in ("train", "val"):
        shutil.copytree(data / split / "images", raw / split / "images")
        shutil.copytree(data / split / "fine", raw / split / "masks")
    r = runner.invoke(app, ["prepare", "folder", str(raw), "--hierarchy", "synthetic", "--out", str(prepared),
                            "--workers", "1", "-q"])
    assert r.exit_code == 0, r.output
    link.symlink_to(raw / "val" / "images", target_is_directory=True)
    image = prepared / "val" / "images" / sorted(p.name for p in (raw / "val" / "images").iterdir())[0]
    before = digest(raw)
    model = exported_models["hiposeg"]
    for folder in (raw / "val" / "images", link):
        fails_with(eval_args(model, prepared, "--save-predictions", folder, "--overwrite"),
                   f"--save-predictions {folder}", f"contains the input image {image} (a link to "
                   f"{raw / 'val' / 'images' / image.name})")
    assert digest(raw) == before


def test_eval_report_inside_a_run_directory_is_that_runs_own_and_never_its_training_report(exported_models, tiny_run,
                                                                                           data, tmp_path):
    """`ablate` tabulates each run's report.json: an evaluation of another model must not replace it
    (nor write its report among another run's files), and no evaluation replaces the training report,
    unless --overwrite. The run's own evaluations write beside it (RUN/eval-val.json by default)."""
    _, trained = tiny_run
    other = tmp_path / "other-run"
    shutil.copytree(trained, other)
    model = exported_models["hiposeg"]
    before = digest(other)
    for report in (other / "report.json", other / "eval-val.json"):
        fails_with(eval_args(model, data, "--report", report), f"--report {report} is inside the run directory "
                   f"{other}, but the model evaluated ({model}) is not that run's")
    fails_with(eval_args(other, data, "--report", other / "report.json"),
               f"--report {other / 'report.json'} is the training report of the run {other}")
    assert digest(other) == before
    assert runner.invoke(app, [str(a) for a in eval_args(other, data)]).exit_code == 0
    assert (other / "eval-val.json").exists() and digest(other)["report.json"] == before["report.json"]
    r = runner.invoke(app, [str(a) for a in eval_args(model, data, "--report", other / "report.json", "--overwrite")])
    assert r.exit_code == 0, r.output
