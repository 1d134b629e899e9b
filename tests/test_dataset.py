"""PreparedDataset, the transform presets and the label-file helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from hiposeg.data.dataset import PreparedDataset, open_prepared, read_label, write_label
from hiposeg.data.transforms import eval_transforms, train_transforms
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy

IGNORE = 255
CELL = 8


def make_prepared(root: Path, samples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], split: str = "train") -> Path:
    """A prepared folder written by hand: {stem: (RGB image, fine, coarse)}."""
    h = Hierarchy.load("synthetic")
    (root / split).mkdir(parents=True, exist_ok=True)
    for stem, (img, fine, coarse) in samples.items():
        for sub, arr in (("images", cv2.cvtColor(img, cv2.COLOR_RGB2BGR)), ("fine", fine), ("coarse", coarse)):
            (root / split / sub).mkdir(exist_ok=True)
            cv2.imwrite(str(root / split / sub / f"{stem}.png"), arr)
    (root / "hierarchy.json").write_text(json.dumps(h.to_dict()))
    (root / "manifest.json").write_text(json.dumps({"hierarchy": {"name": h.name, "sha256": h.sha256},
                                                    "splits": {split: {"images": len(samples)}}, "missing_splits": []}))
    return root


def checkerboard(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Red = column-cell parity (the fine map), green = row-cell parity (the coarse map)."""
    ys, xs = np.mgrid[:h, :w]
    fine = ((xs // CELL + ys // CELL) % 2).astype(np.uint8)
    coarse = ((ys // CELL) % 2).astype(np.uint8)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0], img[..., 1] = fine * 255, coarse * 255
    return img, fine, coarse


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("board") / "data", {"b": checkerboard(60, 90)})


def test_train_transforms_keep_image_and_both_maps_aligned(board):
    tf = train_transforms((48, 64), (0.5, 2.0), True, 0.0, (0, 0, 0), (1, 1, 1), IGNORE)
    ds = PreparedDataset(board, "train", transforms=tf)
    decisive_total = padded_seen = 0
    for seed in range(40):
        s = ds[(0, seed)]
        img, fine, coarse = s["image"], s["fine"], s["coarse"]
        assert img.shape == (3, 48, 64) and img.dtype == torch.float32
        assert fine.shape == coarse.shape == (48, 64) and fine.dtype == coarse.dtype == torch.int64
        pad = fine == IGNORE
        assert torch.equal(pad, coarse == IGNORE)
        assert (img[:, pad] == 0).all()  # padding: ignore in both maps, 0 in the image
        padded_seen += int(pad.any())
        for channel, labels in ((0, fine), (1, coarse)):
            v = img[channel]
            decisive = ~pad & ((v < 0.1) | (v > 0.9))  # away from the cell edges blurred by resizing
            assert torch.equal(labels[decisive], (v[decisive] > 0.5).long()), f"misaligned at seed {seed}"
            decisive_total += int(decisive.sum())
    assert decisive_total > 0.8 * 40 * 2 * 48 * 64 * 0.85
    assert padded_seen > 0  # the zoom-out case was exercised


def test_flip_happens_with_the_maps(board):
    tf = train_transforms((60, 90), (1.0, 1.0), True, 0.0, (0, 0, 0), (1, 1, 1), IGNORE)
    ds = PreparedDataset(board, "train", transforms=tf)
    _, fine, _ = checkerboard(60, 90)
    flipped = {bool(torch.equal(ds[(0, s)]["fine"], torch.from_numpy(fine[:, ::-1].copy()).long())) for s in range(12)}
    assert flipped == {True, False}


def test_seeded_keys_are_reproducible_and_independent_of_global_rng(tmp_path):
    rng = np.random.default_rng(0)
    samples = {}
    for i in range(3):
        labels = rng.integers(0, 15, (40, 50), dtype=np.uint8)
        samples[f"s{i}"] = (rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), labels, labels)
    root = make_prepared(tmp_path / "d", samples)
    tf = train_transforms((32, 32), (0.5, 2.0), True, 0.4, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), IGNORE)
    ds = PreparedDataset(root, "train", transforms=tf)
    torch.manual_seed(1)
    a = ds[(1, 2**63 + 5)]
    torch.manual_seed(999)
    torch.rand(7)
    b = ds[(1, 2**63 + 5)]
    for k in ("image", "fine", "coarse"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(ds[(1, 6)]["image"], ds[(1, 7)]["image"])
    state = torch.get_rng_state()
    ds[(0, 3)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched

    keys = [(i % 3, 100 + i) for i in range(6)]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=keys, num_workers=2)
    for key, batch in zip(keys, loader):
        ref = ds[key]
        assert batch["stem"] == ref["stem"] and torch.equal(batch["image"], ref["image"])
        assert torch.equal(batch["fine"], ref["fine"])


def test_eval_transforms_change_no_geometry(tmp_path):
    img, fine, coarse = checkerboard(37, 53)
    root = make_prepared(tmp_path / "d", {"x": (img, fine, coarse)}, split="val")
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.25, 2.0)
    ds = PreparedDataset(root, "val", transforms=eval_transforms(mean, std), levels=("fine",))
    s = ds[0]
    assert set(s) == {"image", "fine", "stem"} and s["stem"] == "x"
    expected = (torch.from_numpy(img).permute(2, 0, 1).double() / 255 - torch.tensor(mean)[:, None, None].double()) \
        / torch.tensor(std)[:, None, None].double()
    assert torch.allclose(s["image"].double(), expected, atol=1e-6)
    assert torch.equal(s["fine"], torch.from_numpy(fine).long())
    raw = PreparedDataset(root, "val")[0]  # no transforms: the decoded uint8 image
    assert raw["image"].dtype == torch.uint8 and torch.equal(raw["image"], torch.from_numpy(img).permute(2, 0, 1))
    assert torch.equal(raw["coarse"], torch.from_numpy(coarse).long())


def test_open_prepared_names_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"no prepared dataset at data/cityscapes: run `hiposeg prepare cityscapes RAW "
                                        r"--out data/cityscapes`"):
        open_prepared(Path("data/cityscapes"))
    with pytest.raises(UserError, match=r"run `hiposeg prepare synthetic`"):
        open_prepared(Path("data/synthetic"), "train")
    with pytest.raises(UserError, match=r"hiposeg prepare \{cityscapes,ade20k,mapillary,pascal-part,folder\} RAW --out x"):
        open_prepared(Path("x"))
    img, fine, coarse = checkerboard(16, 16)
    root = make_prepared(tmp_path / "p", {"a": (img, fine, coarse)})
    m = json.loads((root / "manifest.json").read_text())
    m["missing_splits"] = ["val"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="has no split 'val' \\(the raw release did not contain it\\); it has: train"):
        open_prepared(root, "val")
    h, manifest = open_prepared(root, "train")
    assert h.name == "synthetic" and manifest["splits"]["train"]["images"] == 1
    # an unfinished prepare run: the journal names the exact command
    unfinished = tmp_path / "u"
    unfinished.mkdir()
    (unfinished / ".prepare-journal.jsonl").write_text(json.dumps({"journal": "hiposeg-prepare-journal/1",
                                                                   "source": "ade20k", "raw_root": "/r/ADE"}) + "\n")
    with pytest.raises(UserError, match=r"did not finish") as e:
        open_prepared(unfinished)
    assert f"hiposeg prepare ade20k /r/ADE --out {unfinished}" in str(e.value)


def test_dataset_reports_broken_links_and_missing_images(tmp_path):
    img, fine, coarse = checkerboard(16, 16)
    root = make_prepared(tmp_path / "p", {"a": (img, fine, coarse), "b": (img, fine, coarse)})
    (root / "train/images/b.png").unlink()
    with pytest.raises(UserError, match="1 images are missing"):
        PreparedDataset(root, "train")
    target = tmp_path / "raw.png"
    shutil.copy(root / "train/images/a.png", target)
    (root / "train/images/a.png").unlink()
    (root / "train/images/a.png").symlink_to(target)
    shutil.copy(target, root / "train/images/b.png")
    ds = PreparedDataset(root, "train")
    target.unlink()  # the raw release moved away
    with pytest.raises(UserError, match="was the raw release moved"):
        ds[0]


def test_read_label_gives_palette_indices_and_names_bad_files(tmp_path, write_palette_png):
    idx = np.arange(60, dtype=np.uint8).reshape(6, 10)
    p = write_palette_png(tmp_path / "pal.png", idx, np.random.default_rng(0).integers(0, 256, (256, 3)))
    np.testing.assert_array_equal(read_label(p), idx)
    deep = np.arange(0, 60000, 1000, dtype=np.uint16).reshape(6, 10)
    write_label(tmp_path / "d.png", deep)
    got = read_label(tmp_path / "d.png")
    assert got.dtype == np.uint16 and np.array_equal(got, deep)
    (tmp_path / "cut.png").write_bytes(p.read_bytes()[:40])
    with pytest.raises(UserError, match=f"cannot read label map {tmp_path / 'cut.png'}: truncated"):
        read_label(tmp_path / "cut.png")
    with pytest.raises(ValueError):
        write_label(tmp_path / "x.png", np.zeros((2, 2), np.int64))
