"""`hiposeg predict`: fine and coarse label PNGs and overlays with the right sizes and values."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import fails_with
from hiposeg.cli import app
from hiposeg.config import ModelConfig
from hiposeg.models import build_segmenter

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="session")
def model_file(tiny_run, exported_models) -> tuple[Path, Path]:
    """(exported hiposeg-format model, its run directory) of the tiny 2-iteration run."""
    _, run = tiny_run
    return exported_models["hiposeg"], run


INPUT_FILES = {"a": "a.png", "b": "sub/b.png", "c": "c.jpg", "d": "d.png"}


@pytest.fixture
def images(tmp_path) -> dict[str, np.ndarray]:
    """RGB images of three sizes (one larger than the 64x64 training crop), as PNG and JPEG (c.jpg), one in
    a subfolder (INPUT_FILES). JPEG is lossy, so each image is returned as read back from its file."""
    rng = np.random.default_rng(0)
    sizes = {"a": (64, 64), "b": (64, 64), "c": (40, 72), "d": (96, 130)}
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    imgs = {}
    for stem, hw in sizes.items():
        path = root / INPUT_FILES[stem]
        cv2.imwrite(str(path), cv2.cvtColor(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), cv2.COLOR_RGB2BGR))
        imgs[stem] = read(path)
    return imgs


def expected_logits(run: Path, rgb: np.ndarray) -> torch.Tensor:
    """The trained segmenter on the image normalised by hand (whole image)."""
    m = build_segmenter(ModelConfig(backbone="resnet18", output_stride=16), 15)
    m.load_state_dict(torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"])
    x = torch.from_numpy(((rgb / 255.0 - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        return m.eval()(x)


def pi_and_palette(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """pi (fine id -> coarse id) and the fine palette, from the prepared dataset's hierarchy file."""
    h = json.loads((run.parent / "synthetic" / "hierarchy.json").read_text())
    coarse = {c["name"]: c["id"] for c in h["levels"][1]["classes"]}
    fine = sorted(h["levels"][0]["classes"], key=lambda c: c["id"])
    return np.array([coarse[c["parent"]] for c in fine]), np.array([c["color"] for c in fine])


def read(path: Path) -> np.ndarray:
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert a is not None, path
    return cv2.cvtColor(a, cv2.COLOR_BGR2RGB) if a.ndim == 3 else a


def test_predict_writes_fine_coarse_and_overlays_with_the_models_values(model_file, images, tmp_path, cli):
    model, run = model_file
    out = tmp_path / "out"
    r = cli.invoke(app, ["predict", str(model), str(tmp_path / "in"), "--out", str(out), "--device", "cpu",
                            "--workers", "0", "--mode", "whole", "--overlay", "both"])
    assert r.exit_code == 0, r.output
    assert "4 image(s)" in r.output
    pi, palette = pi_and_palette(run)
    assert images["c"].shape == (40, 72, 3)  # c.jpg: its outputs are c.png, at its size, with its values
    for stem, rgb in images.items():
        fine, coarse = read(out / "fine" / f"{stem}.png"), read(out / "coarse" / f"{stem}.png")
        assert fine.shape == coarse.shape == rgb.shape[:2] and fine.dtype == np.uint8
        want = expected_logits(run, rgb)[0].argmax(0).numpy()
        assert (fine == want).mean() > 0.999, stem  # float ties aside, the argmax of the model on that image
        assert np.array_equal(coarse, pi[fine])
        overlay = read(out / "overlay" / f"{stem}.png")
        assert overlay.shape == rgb.shape
        blend = 0.5 * rgb.astype(np.float64) + 0.5 * palette[fine]
        assert np.abs(overlay.astype(np.float64) - blend).max() <= 1.0
        assert read(out / "overlay-coarse" / f"{stem}.png").shape == rgb.shape


def test_batching_and_sliding_windows(model_file, images, tmp_path):
    from hiposeg.export import load_inference_model
    from hiposeg.inference import slide_logits
    from hiposeg.predict import predict

    model, run = model_file
    loaded = load_inference_model(model)
    one = predict(loaded, [tmp_path / "in"], tmp_path / "one", batch_size=1, workers=0, progress=False, mode="whole")
    many = predict(loaded, [tmp_path / "in"], tmp_path / "many", batch_size=8, workers=0, progress=False, mode="whole")
    assert (one.batches, many.batches) == (4, 3)  # a and b share a size
    for stem in images:
        assert np.array_equal(read(tmp_path / "one" / "fine" / f"{stem}.png"),
                              read(tmp_path / "many" / "fine" / f"{stem}.png"))
    # auto = sliding 64x64 windows for the 96x130 image only; a symlinked input keeps its own name
    (tmp_path / "link.png").symlink_to(tmp_path / "in" / "d.png")
    predict(loaded, [tmp_path / "link.png"], tmp_path / "auto", workers=0, progress=False)
    rgb = images["d"]
    x = torch.from_numpy(((rgb / 255.0 - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]
    want = slide_logits(loaded.module, x, 15, (64, 64))[0].argmax(0).numpy()
    assert (read(tmp_path / "auto" / "fine" / "link.png") == want).mean() > 0.999


@pytest.mark.slow
def test_predict_from_a_torch_export_program_matches_the_hiposeg_file(exported_models, images, tmp_path, cli):
    formats = [(exported_models["hiposeg"], "a"), (exported_models["torch-export"], "b")]
    if "onnx" in exported_models and importlib.util.find_spec("onnxruntime"):
        formats.append((exported_models["onnx"], "c"))
    for path, name in formats:
        r = cli.invoke(app, ["predict", str(path), str(tmp_path / "in" / "*.*"), "--out", str(tmp_path / name),
                                "--device", "cpu", "--workers", "0", "--overlay", "none", "-q"])
        assert r.exit_code == 0, r.output
        assert not (tmp_path / name / "overlay").exists()
    for stem in ("a", "c", "d"):  # the glob is not recursive: sub/b.png is not matched
        ref = read(tmp_path / "a" / "fine" / f"{stem}.png")
        for _, name in formats[1:]:
            assert (read(tmp_path / name / "fine" / f"{stem}.png") == ref).mean() > 0.999
    assert not (tmp_path / "a" / "fine" / "b.png").exists()


def test_an_input_name_too_long_for_its_outputs_is_refused_before_any_output(model_file, tmp_path):
    """`p * 242 + .png` is a legal name, but its output's temp name (14 bytes longer) is not: predict
    used to fail at the first write with the hint "Free disk space"."""
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "ok.png"), np.zeros((32, 32, 3), np.uint8))
    long = photos / ("p" * 242 + ".png")
    cv2.imwrite(str(long), np.zeros((32, 32, 3), np.uint8))
    out = tmp_path / "out"
    fails_with(["predict", model_file[0], photos, "--out", out, "--device", "cpu", "--workers", "0"],
               f"input image {long}", "would be 246 bytes long", "255-byte limit", "at most 237 bytes")
    assert not out.exists()


def test_a_name_too_long_while_writing_gets_the_fix_for_names_not_for_disk_space(tmp_path):
    from hiposeg.errors import UserError
    from hiposeg.predict import write_png

    with pytest.raises(UserError, match="File name too long") as e:
        write_png(tmp_path / ("n" * 250 + ".png"), np.zeros((4, 4), np.uint8))
    assert "at most 255 bytes" in e.value.hint and "rename the input file" in e.value.hint, e.value.hint
    assert "Free disk space" not in e.value.hint


def test_bad_inputs_are_clear_errors_before_any_output(model_file, tmp_path):
    model, _ = model_file
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    good = np.zeros((32, 32, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "bad" / "ok.png"), good)
    data = cv2.imencode(".png", good)[1].tobytes()
    (tmp_path / "bad" / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "dup").mkdir()
    cv2.imwrite(str(tmp_path / "dup" / "ok.jpg"), good)
    (tmp_path / "damaged").mkdir()  # a JPEG with damaged compressed data that OpenCV would decode silently
    jpg = bytearray(cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))[1])
    jpg[len(jpg) // 3: 2 * len(jpg) // 3] = bytes(len(jpg) // 3)
    (tmp_path / "damaged" / "photo.jpg").write_bytes(bytes(jpg))
    os.mkfifo(tmp_path / "pipe.png")  # was "does not exist"; opening it would block
    cases = [([str(tmp_path / "empty")], "holds no image files"), ([str(tmp_path / "missing.png")], "does not exist"),
             ([str(tmp_path / "none" / "*.jpg")], "matches no image files"), ([str(tmp_path / "bad")], "cut.png"),
             ([str(tmp_path / "bad" / "ok.png"), str(tmp_path / "dup")], "share the name"),
             ([str(tmp_path / "damaged")], "corrupt JPEG image (Corrupt JPEG data"),
             ([str(tmp_path / "pipe.png")], "is a named pipe (FIFO), not an image file")]
    fails_with(["predict", model_file[1], tmp_path / "bad" / "ok.png", "--checkpoint", "bset", "--out",
                tmp_path / "out", "--device", "cpu"], "--checkpoint 'bset' is not best or last")  # not a silent last.pt
    for inputs, words in cases:
        out = tmp_path / "out"
        fails_with(["predict", model, *inputs, "--out", out, "--device", "cpu", "--workers", "0"], words)
        assert not out.exists()


@pytest.mark.parametrize("fmt,sides", [("torch-export", "32 to 8192"), ("onnx", "at least 32")])
def test_program_input_limits_are_checked_for_every_image_before_any_prediction_is_written(
        exported_models, tiny_data, tmp_path, fmt, sides):
    """predict: a 20-pixel-high image after a good one stops the command before the good one is written;
    eval: a split of 24x24 images is refused before --save-predictions gets a file. --mode slide (windows
    of the 64x64 training crop) works for both."""
    if fmt not in exported_models:
        pytest.skip("onnx is not installed")
    model = exported_models[fmt]
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), np.zeros((64, 64, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "in" / "b.png"), np.zeros((20, 64, 3), np.uint8))
    out = tmp_path / "out"
    fails_with(["predict", model, tmp_path / "in", "--out", out, "--mode", "whole", "--device", "cpu",
                "--workers", "0"], f"image {tmp_path / 'in' / 'b.png'} (64x20 pixels, whole mode)",
               f"this exported model takes images of {sides} pixels per side; got 20x64", "--mode slide")
    assert not any(p.is_file() for p in out.rglob("*")) if out.exists() else True
    small = tmp_path / "small"  # the tiny set with its val split shrunk to 24x24 (the generator draws >= 32)
    shutil.copytree(tiny_data, small)
    for folder, interpolation in (("images", cv2.INTER_AREA), ("fine", cv2.INTER_NEAREST), ("coarse", cv2.INTER_NEAREST)):
        for f in (small / "val" / folder).iterdir():
            pixels = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(f), cv2.resize(pixels, (24, 24), interpolation=interpolation))
    saved = tmp_path / "saved"
    fails_with(["eval", model, "--data", small, "--save-predictions", saved, "--device", "cpu", "--workers", "0",
                "--report", tmp_path / "r.json"], "(24x24 pixels, auto mode)", f"takes images of {sides} pixels")
    assert not any(saved.iterdir()) if saved.exists() else True
    for args in (["predict", model, tmp_path / "in", "--out", out], ["eval", model, "--data", small, "--save-predictions",
                                                                     saved, "--report", tmp_path / "r.json"]):
        r = CliRunner().invoke(app, [str(a) for a in args] + ["--mode", "slide", "--device", "cpu", "--workers", "0"])
        assert r.exit_code == 0, r.output
