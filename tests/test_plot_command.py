"""`hiposeg plot` end to end on two tiny runs (CE only and every term): all eight kinds of picture, a
self-contained page and numbers.json that agree with the runs' reports; its output-folder rules; the
install hint without the `plots` extra; old reports (no confusion matrices) are evaluated again."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import fails_with, tiny_config
from hiposeg.cli import app
from hiposeg.errors import UserError

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

PICTURES = ["curves.png", "curves.svg", "iou-fine.png", "iou-fine.svg", "iou-coarse.png", "iou-coarse.svg",
            "levels.png", "levels.svg", "featuremap.png", "geometry.png", "confusion-fine.png", "confusion-coarse.png",
            "gallery.png", "ablation.png", "ablation.svg"]


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, CE-only run, all-terms run): the suite's tiny recipe, 8 iterations each."""
    from hiposeg.engine import fit

    base = tmp_path_factory.mktemp("plot-runs")
    fit(tiny_config(tiny_data, base / "ce", loss={"terms": ["ce"]}))
    fit(tiny_config(tiny_data, base / "hiposeg"))
    return tiny_data, base / "ce", base / "hiposeg"


def plot(args: list, cli) -> str:
    r = cli.invoke(app, ["plot", *map(str, args), "--device", "cpu", "--pixels-per-class", "40", "--gallery", "1"])
    assert r.exit_code == 0, r.output
    return r.output


def test_one_command_draws_all_eight_pictures_and_a_self_contained_page(two_runs, tmp_path, cli):
    data, ce, hipo = two_runs
    out = tmp_path / "plots"
    plot([hipo, "--baseline", ce, "--out", out], cli)
    assert sorted(p.name for p in out.iterdir()) == sorted(PICTURES + ["numbers.json", "report.html", ".hiposeg.lock"])
    for name in PICTURES:
        if name.endswith(".png"):
            image = cv2.imread(str(out / name))
            assert image is not None and (image < 200).any(axis=2).mean() > 0.01, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 10  # every picture embedded in the one file
    assert not re.search(r"(src|href)=['\"]?(https?:|//|[\w./-]+\.(png|svg|css|js))", page)  # nothing loaded from elsewhere
    numbers = json.loads((out / "numbers.json").read_text())
    assert numbers["format"] == "hiposeg-plots/1" and numbers["skipped"] == {}
    assert {r["scores_from"] for r in numbers["runs"].values()} == {"report.json"}  # no second evaluation
    reports = {name: json.loads((d / "report.json").read_text()) for name, d in (("ce", ce), ("hiposeg", hipo))}
    per_class = numbers["pictures"]["iou-fine"]["per_class"]
    for cls, row in per_class.items():
        run, bl = reports["hiposeg"]["levels"]["fine"]["IoU"][cls], reports["ce"]["levels"]["fine"]["IoU"][cls]
        assert (row["run"], row["baseline"]) == (run, bl)
        assert row["gain"] == (None if run is None or bl is None else pytest.approx(run - bl))
    geometry = numbers["pictures"]["geometry"]["sets"]
    assert sorted(geometry) == ["ce — class means of the decoder feature", "hiposeg — class means of the decoder feature",
                                "hiposeg — learned prototypes (memory)"]  # the CE run has no memory
    counts = numbers["pictures"]["featuremap"]["pixels_per_class"]
    assert max(counts.values()) == 40 and numbers["pictures"]["featuremap"]["pixels"] == sum(counts.values())
    assert [g["why"] for g in numbers["pictures"]["gallery"]["images"]] in (
        ["worst", "best"], ["largest improvement"], ["largest regression"], ["largest improvement", "largest regression"])
    assert numbers["pictures"]["levels"]["mIoU"]["ce"]["fine"] == reports["ce"]["levels"]["fine"]["mIoU"]


def test_a_rerun_replaces_its_own_folder_and_foreign_or_dataset_folders_are_refused(two_runs, tmp_path, cli):
    data, ce, hipo = two_runs
    out = tmp_path / "plots"
    plot([hipo, "--out", out, "--no-svg", "--embedding", "pca"], cli)
    before = (out / "report.html").stat().st_mtime_ns
    plot([hipo, "--baseline", ce, "--out", out, "--no-svg", "--embedding", "pca"], cli)  # its own folder: replaced
    assert (out / "report.html").stat().st_mtime_ns != before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    fails_with(["plot", hipo, "--out", foreign], "--out", foreign, "is not empty and was not written by `hiposeg plot`",
               "notes.txt")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    fails_with(["plot", hipo, "--out", data / "plots"], "is inside the prepared dataset")
    fails_with(["plot", hipo, "--baseline", ce, "--out", tmp_path / "x", "--show", "nope"], "--show nope: no such image in")
    assert not (tmp_path / "x" / "curves.png").exists()  # refused before drawing
    fails_with(["plot", tmp_path / "absent"], "run directory", "is missing")
    fails_with(["plot", data], "is not a hiposeg run directory (it has no config.yaml)")
    fails_with(["plot"], "give a run directory to plot")


def test_a_report_without_confusion_matrices_is_evaluated_again_to_the_same_scores(two_runs, tmp_path, cli):
    _, _, hipo = two_runs
    old = tmp_path / "old-run"
    shutil.copytree(hipo, old, ignore=shutil.ignore_patterns(".hiposeg.lock", "plots"))
    report = json.loads((old / "report.json").read_text())
    for level in report["levels"].values():
        del level["confusion"]  # as written before reports held them
    (old / "report.json").write_text(json.dumps(report))
    plot([old, "--out", tmp_path / "plots", "--no-svg", "--embedding", "pca"], cli)
    numbers = json.loads((tmp_path / "plots" / "numbers.json").read_text())
    assert "written before reports held confusion matrices" in numbers["runs"]["old-run"]["scores_from"]
    again = numbers["pictures"]["iou-fine"]["per_class"]
    assert {c: r["run"] for c, r in again.items()} == pytest.approx(report["levels"]["fine"]["IoU"])


def test_without_the_plots_extra_the_command_says_how_to_install_it(two_runs, monkeypatch):
    _, _, hipo = two_runs
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    out = fails_with(["plot", hipo], "`hiposeg plot` needs scikit-learn, which is not installed: pip install "
                                     "'hiposeg[plots]'")
    assert out.count("error:") == 1 and "Traceback" not in out  # one message (Rich wraps it at 80 columns)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    fails_with(["plot", hipo], "needs matplotlib and scikit-learn, which are not installed")


def test_runs_of_different_hierarchies_are_not_compared(two_runs):
    from hiposeg.hierarchy import Hierarchy
    from hiposeg.plots.inputs import check_same_hierarchy, read_run

    _, ce, hipo = two_runs
    a, b = read_run(ce), read_run(hipo)
    b.__dict__["hierarchy"] = Hierarchy.load("cityscapes")
    with pytest.raises(UserError, match=r"were trained with different hierarchies \(synthetic \w+, cityscapes \w+\)"):
        check_same_hierarchy([a, b])


def test_a_torn_last_log_line_is_skipped_and_counted(tmp_path):
    from hiposeg.plots.inputs import read_metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iter": 10, "loss": 1.0}\n{"iter": 20, "eval": {"fine": 5.0}}\n{"iter": 30, "lo')
    rows, unreadable = read_metrics(log)
    assert [r["iter"] for r in rows] == [10, 20] and unreadable == 1
    assert np.isfinite(rows[0]["loss"])
