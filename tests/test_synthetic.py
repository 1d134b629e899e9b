"""The built-in synthetic set: deterministic by seed, in the prepared format, and built so that
parts of different objects share their appearance (the situation HiPoSeg targets)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import squash
from hiposeg.cli import app
from hiposeg.data.layout import JOURNAL_NAME
from hiposeg.data.synthetic import generate
from hiposeg.lock import LOCK_NAME
from hiposeg.hierarchy import Hierarchy


def files(root: Path) -> dict[str, bytes]:
    """The dataset's files (not the manifest, with its creation time, nor the lock and journal)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name not in ("manifest.json", LOCK_NAME, JOURNAL_NAME)}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = generate(tmp_path / "a", train=6, val=3, size=64, seed=1, workers=1).out
    b = generate(tmp_path / "b", train=6, val=3, size=64, seed=1, workers=2).out
    c = generate(tmp_path / "c", train=6, val=3, size=64, seed=2, workers=1).out
    fa, fb, fc = files(a), files(b), files(c)
    assert len(fa) == 1 + 3 * 9 and fa == fb
    assert fa["train/images/synthetic_train_00000.png"] != fc["train/images/synthetic_train_00000.png"]
    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (a, b))
    ma.pop("created"), mb.pop("created")
    assert ma == mb


def test_prepared_format_and_manifest(tmp_path):
    root = generate(tmp_path / "syn", train=5, val=2, size=48, seed=0, workers=1).out
    m = json.loads((root / "manifest.json").read_text())
    h = Hierarchy.from_file(root / "hierarchy.json")
    assert m["source"] == "synthetic" and m["raw_root"] is None and m["missing_splits"] == []
    assert m["hierarchy"] == {"name": "synthetic", "sha256": h.sha256}
    assert m["options"] == {"train": 5, "val": 2, "size": 48, "seed": 0}
    for split, n in (("train", 5), ("val", 2)):
        imgs = sorted((root / split / "images").iterdir())
        assert len(imgs) == n and all(p.is_file() and not p.is_symlink() for p in imgs)
        total = 0
        for p in imgs:
            img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            fine = cv2.imread(str(root / split / "fine" / p.name), cv2.IMREAD_UNCHANGED)
            coarse = cv2.imread(str(root / split / "coarse" / p.name), cv2.IMREAD_UNCHANGED)
            assert img.shape == (48, 48, 3) and fine.shape == coarse.shape == (48, 48) and fine.dtype == np.uint8
            np.testing.assert_array_equal(coarse, h.fine_to_coarse[fine])  # coarse = pi(fine), eq. 2
            total += fine.size
        px = m["splits"][split]["pixels"]
        assert m["splits"][split]["images"] == n and sum(px["fine"].values()) + px["ignore"] == total


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Hierarchy, dict[str, np.ndarray], list[np.ndarray], list[np.ndarray]]:
    root = generate(tmp_path_factory.mktemp("s") / "syn", train=60, val=1, size=128, seed=0, workers=1).out
    h = Hierarchy.from_file(root / "hierarchy.json")
    names = h.names(h.fine_level)
    pixels: dict[str, list[np.ndarray]] = {n: [] for n in names}
    fines, coarses = [], []
    for p in sorted((root / "train/fine").iterdir()):
        fine = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        img = cv2.cvtColor(cv2.imread(str(root / "train/images" / p.name)), cv2.COLOR_BGR2RGB)
        for i, n in enumerate(names):
            pixels[n].append(img[fine == i].astype(np.float64))
        fines.append(fine)
        coarses.append(cv2.imread(str(root / "train/coarse" / p.name), cv2.IMREAD_UNCHANGED))
    return h, {n: np.concatenate(v) for n, v in pixels.items()}, fines, coarses


def test_hierarchy_shape(scenes):
    h, pixels, fines, _ = scenes
    objects = [c for c in h.classes(h.coarse_level) if c.name != "background"]
    assert len(objects) >= 4 and h.num_fine >= 12
    background = h.children(h.coarse_level)[h.names(h.coarse_level).index("background")]
    assert 1 <= len(background) <= 2
    assert all(len(pixels[n]) > 0 for n in h.names(h.fine_level))  # every part occurs in 60 scenes


def test_parts_of_different_objects_share_appearance(scenes):
    _, px, _, _ = scenes
    mean = {n: v.mean(0) for n, v in px.items()}

    def spread(group: list[str]) -> float:
        return max(np.linalg.norm(mean[a] - mean[b]) for a in group for b in group)

    glass = ["house_window", "car_window", "bus_window", "boat_window"]
    body = ["house_wall", "car_body", "bus_body", "boat_hull"]
    dark = ["house_door", "car_wheel", "bus_wheel"]
    assert spread(glass) < 15 and spread(dark) < 20
    assert spread(body) < 45  # any hue per instance: the mean over a few dozen instances is noisier
    assert np.linalg.norm(mean["car_window"] - mean["car_wheel"]) > 150  # the families themselves differ

    # colour alone barely tells the windows of the four objects apart (chance: 0.25)
    centres = np.stack([mean[n] for n in glass])
    hits = sum(int((((px[n][:, None] - centres[None]) ** 2).sum(-1).argmin(1) == k).sum()) for k, n in enumerate(glass))
    assert hits / sum(len(px[n]) for n in glass) < 0.5


def test_scenes_vary_in_scale_and_content(scenes):
    h, _, fines, coarses = scenes
    names = h.names(h.coarse_level)
    areas = {n: [int((c == i).sum()) for c in coarses if (c == i).any()] for i, n in enumerate(names)}
    for n in names[1:]:
        assert max(areas[n]) > 4 * min(areas[n]), n  # perspective scale, occlusion and cropping
    per_image = [len(set(np.unique(c).tolist()) - {0}) for c in coarses]
    assert min(per_image) >= 1 and max(per_image) >= 3


def test_cli_prepare_synthetic(tmp_path, cli):
    args = ["prepare", "synthetic", "--out", str(tmp_path / "syn"), "--train", "3", "--val", "2", "--size", "40",
            "--workers", "1", "-q"]
    r = cli.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "syn/train/images/synthetic_train_00002.png").is_file()
    r = cli.invoke(app, args)
    assert r.exit_code == 0 and "nothing to do" in r.output
    r = cli.invoke(app, [*args[:-3], "--seed", "5", "--workers", "1", "-q"])
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output
    r = cli.invoke(app, [*args[:-3], "--seed", "5", "--workers", "1", "-q", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "syn/manifest.json").read_text())["options"]["seed"] == 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other/mine.txt").write_text("keep")
    r = cli.invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "other"), "--overwrite", "-q"])
    assert r.exit_code == 2 and "holds no hiposeg prepared dataset" in r.output
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["mine.txt"]


def test_cli_prepare_synthetic_shows_progress_and_summary(tmp_path, cli):
    """Without -q: a progress bar on stderr ending at all files done, the summary table on stdout."""
    out = tmp_path / "syn"
    r = cli.invoke(app, ["prepare", "synthetic", "--out", str(out), "--train", "3", "--val", "2", "--size", "40"])
    assert r.exit_code == 0, r.output
    assert re.search(r"synthetic\b.*\b5/5\b", r.stderr), r.stderr
    table = squash(r.stdout)  # a long tmp path may still wrap
    assert squash(f"prepared synthetic -> {out}") in table, r.stdout
    assert re.search(r"train\W+3\W+0\W", table) and re.search(r"val\W+2\W+0\W", table), r.stdout
    assert "datasetready:" in table and (out / "val/fine/synthetic_val_00001.png").is_file()
    quiet = cli.invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "q"), "--train", "3", "--val", "2",
                             "--size", "40", "-q"])
    assert quiet.exit_code == 0 and "5/5" not in quiet.stderr
