"""Reliability: checkpoints passed around.

* A checkpoint whose pickle would run code (a `__reduce__` payload that creates a marker file) is
  refused by every command that reads one (`eval`, `train --resume`, `export`, `predict`) without
  running it: the marker never appears. The same file does run its payload under a plain
  `torch.load(weights_only=False)`, so the test can tell.
* A checkpoint of another architecture is refused with a message naming the setting. (Another
  hierarchy: tests/test_resume.py::test_corrupt_and_foreign_checkpoints_are_refused, for `eval`
  and `--resume`.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fails_with
from crafted import Payload
from faults import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def evil(tiny_run, tmp_path) -> tuple[Path, Path]:
    """(a real checkpoint with a code-running payload added, the payload's marker file)."""
    _, run = tiny_run
    marker = tmp_path / "PAYLOAD-RAN"
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["last_eval"] = Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)
    return path, marker


def refuses(args: list, marker: Path, *needles: str) -> None:
    try:
        fails_with(args, "refusing to load", "only unsafe unpickling could restore", *needles)
    finally:
        assert not marker.exists(), f"the payload RAN during `hiposeg {args[0]}`"


def test_payload_is_live(evil):
    """Control: loaded the unsafe way, the file runs its code (in a throw-away process)."""
    path, marker = evil
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   check=True, capture_output=True)
    assert marker.exists()


def test_eval_refuses_code_in_a_checkpoint(tiny_run, evil):
    data, _ = tiny_run
    path, marker = evil
    refuses(["eval", path, "--data", data, "--device", "cpu", "--workers", "0"], marker, str(path))


def test_eval_of_a_run_directory_refuses_its_unsafe_best_checkpoint(tiny_run, evil, tmp_path):
    data, _ = tiny_run
    path, marker = evil
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path.rename(run / "checkpoints" / "best.pt")
    refuses(["eval", run, "--data", data, "--device", "cpu", "--workers", "0"], marker, "best.pt")


def test_resume_refuses_code_in_a_checkpoint(tiny_run, evil, tmp_path):
    data, _ = tiny_run
    path, marker = evil
    refuses(["train", "--resume", path, "--data", data, "--quiet", "--device", "cpu"], marker, str(path))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path.rename(run / "checkpoints" / "last.pt")
    refuses(["train", "--resume", "last", "--out", run, "--quiet", "--device", "cpu"], marker, "last.pt")


def test_export_refuses_code_in_a_checkpoint(evil, tmp_path):
    path, marker = evil
    refuses(["export", path, "--out", tmp_path / "model.pt"], marker, str(path))
    assert not (tmp_path / "model.pt").exists()


def test_predict_refuses_code_in_a_checkpoint(tiny_run, evil, tmp_path):
    data, _ = tiny_run
    path, marker = evil
    image = sorted((data / "val" / "images").iterdir())[0]
    refuses(["predict", path, image, "--out", tmp_path / "pred", "--device", "cpu", "--workers", "0", "-q"],
            marker, str(path))
    assert not list(tmp_path.glob("pred/**/*.png"))


# ------------------------------------------------------------------------------------------
# Checkpoints of another architecture
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, field", [
    ("--backbone", "resnet50", "model.backbone"),
    ("--output-stride", "8", "model.output_stride"),
    ("--set", "model.embed_dim=64", "model.embed_dim"),
    ("--set", "model.decoder_channels=128", "model.decoder_channels"),
    ("--set", "model.aux_head=false", "model.aux_head"),
])
def test_resume_with_another_architecture_names_the_setting(tiny_run, flag, value, field):
    _, run = tiny_run
    fails_with(["train", "--resume", "last", "--out", run, flag, value, "--quiet", "--device", "cpu"],
               "settings differ from the checkpoint", field)


@pytest.mark.parametrize("field, value, saved_value", [("output_stride", 8, 16), ("decoder_channels", 128, 256),
                                                       ("aux_head", False, True)])
def test_engine_refuses_a_checkpoint_of_another_architecture(tiny_run, tmp_path, field, value, saved_value):
    """`fit(cfg, resume=...)` (the API `ablate` uses) checks the architecture itself."""
    from hiposeg.config import validate_config
    from hiposeg.engine import fit
    from hiposeg.errors import UserError

    data, run = tiny_run
    ckpt = run / "checkpoints" / "last.pt"
    saved = torch.load(ckpt, weights_only=True)["config"]
    saved["model"][field] = value
    saved["run"]["out"] = str(tmp_path / "other")
    with pytest.raises(UserError, match=rf"has model.{field}={saved_value}, but the configuration asks for {value}"):
        fit(validate_config(saved), resume=ckpt)


def test_eval_refuses_weights_that_do_not_match_the_recorded_architecture(tiny_run, tmp_path):
    data, run = tiny_run
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["config"]["model"]["backbone"] = "resnet50"  # resnet18 weights under a resnet50 label
    path = tmp_path / "relabelled.pt"
    torch.save(ckpt, path)
    fails_with(["eval", path, "--data", data, "--device", "cpu", "--workers", "0"],
               f"{path} does not match its recorded architecture", "resnet50")
