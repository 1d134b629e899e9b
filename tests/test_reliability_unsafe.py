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

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from crafted import Payload
from faults import make_tiny_data, one_thread  # noqa: F401
from hiposeg.cli import app
from hiposeg.errors import UserError

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def squash(text: str) -> str:
    return "".join(text.split())


def has_command(name: str) -> bool:
    return any((c.name or c.callback.__name__) == name for c in app.registered_commands)


def needs(command: str):  # type: ignore[no-untyped-def]
    return pytest.mark.skipif(not has_command(command), reason=f"hiposeg has no `{command}` command yet")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(prepared data, a finished 2-iteration run directory)."""
    from hiposeg.config import build_config
    from hiposeg.engine import fit

    base = tmp_path_factory.mktemp("unsafe")
    data = make_tiny_data(base / "synthetic")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in `one_thread`, for the whole fixture
    fit(build_config({
        "data": {"dataset": "custom", "root": str(data), "crop": (64, 64), "workers": 0},
        "model": {"backbone": "resnet18", "output_stride": 16, "embed_dim": 32},
        "optim": {"iters": 2, "batch_size": 2},
        "run": {"out": str(base / "run"), "device": "cpu", "ckpt_every": 2, "quiet": True, "eval_mode": "whole"},
    }))
    torch.set_num_threads(threads)
    return data, base / "run"


@pytest.fixture
def evil(trained, tmp_path) -> tuple[Path, Path]:
    """(a real checkpoint with a code-running payload added, the payload's marker file)."""
    _, run = trained
    marker = tmp_path / "PAYLOAD-RAN"
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["last_eval"] = Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)
    return path, marker


def refuses(args: list, marker: Path, *needles: str) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    assert not marker.exists(), f"the payload RAN during `hiposeg {args[0]}`"
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for needle in ("refusing to load", "only unsafe unpickling could restore", *needles):
        assert squash(needle) in squash(r.output), (needle, r.output)


def test_payload_is_live(evil):
    """Control: loaded the unsafe way, the file runs its code (in a throw-away process)."""
    path, marker = evil
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   check=True, capture_output=True)
    assert marker.exists()


def test_eval_refuses_code_in_a_checkpoint(trained, evil):
    data, _ = trained
    path, marker = evil
    refuses(["eval", path, "--data", data, "--device", "cpu", "--workers", "0"], marker, str(path))


def test_eval_of_a_run_directory_refuses_its_unsafe_best_checkpoint(trained, evil, tmp_path):
    data, _ = trained
    path, marker = evil
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path.rename(run / "checkpoints" / "best.pt")
    refuses(["eval", run, "--data", data, "--device", "cpu", "--workers", "0"], marker, "best.pt")


def test_resume_refuses_code_in_a_checkpoint(trained, evil, tmp_path):
    data, _ = trained
    path, marker = evil
    refuses(["train", "--resume", path, "--data", data, "--quiet", "--device", "cpu"], marker, str(path))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path.rename(run / "checkpoints" / "last.pt")
    refuses(["train", "--resume", "last", "--out", run, "--quiet", "--device", "cpu"], marker, "last.pt")


@needs("export")
def test_export_refuses_code_in_a_checkpoint(evil, tmp_path):
    path, marker = evil
    refuses(["export", path, "--out", tmp_path / "model.pt"], marker, str(path))
    assert not (tmp_path / "model.pt").exists()


@needs("predict")
def test_predict_refuses_code_in_a_checkpoint(trained, evil, tmp_path):
    data, _ = trained
    path, marker = evil
    image = sorted((data / "val" / "images").iterdir())[0]
    refuses(["predict", path, image, "--out", tmp_path / "pred", "--device", "cpu", "--workers", "0", "-q"],
            marker, str(path))
    assert not list(tmp_path.glob("pred/**/*.png"))


def crafted_program(path: Path, marker: Path) -> Path:
    """A torch.export archive (.pt2) whose pickled sample inputs carry the payload."""
    program = torch.export.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 8, 8),))
    clean = path.with_name("clean.pt2")
    torch.export.save(program, clean, extra_files={"hiposeg.json": "{}"})
    buf = io.BytesIO()
    torch.save({"x": Payload(marker)}, buf)
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = buf.getvalue() if info.filename.endswith("sample_inputs/model.pt") else src.read(info)
            dst.writestr(info, data)
    return path


@needs("predict")
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_commands_refuse_code_in_a_torch_export_archive(trained, tmp_path, command):
    data, _ = trained
    marker = tmp_path / "PAYLOAD-RAN"
    model = crafted_program(tmp_path / "model.pt2", marker)
    if command == "eval":
        args = ["eval", model, "--data", data, "--device", "cpu", "--workers", "0"]
    else:
        image = sorted((data / "val" / "images").iterdir())[0]
        args = ["predict", model, image, "--out", tmp_path / "pred", "--device", "cpu", "--workers", "0", "-q"]
    r = runner.invoke(app, [str(a) for a in args])
    assert not marker.exists(), f"the payload RAN during `hiposeg {command}`"
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert squash("refusing to load") in squash(r.output) and squash(str(model)) in squash(r.output), r.output


def pickled_weight_program(path: Path, marker: Path) -> Path:
    """A .pt2 whose weight entry says use_pickle and whose bytes are a code-running pickle (each
    record stored once, so torch and Python read the same bytes)."""
    program = torch.export.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 8, 8),))
    clean = path.with_name("clean-w.pt2")
    torch.export.save(program, clean, extra_files={"hiposeg.json": "{}"})
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    with zipfile.ZipFile(clean) as src:
        config_name = next(n for n in src.namelist() if n.endswith("weights/model_weights_config.json"))
        cfg = json.loads(src.read(config_name))
        first = next(iter(cfg["config"].values()))
        first["use_pickle"] = True
        target = config_name.replace("model_weights_config.json", first["path_name"])
        with zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                data = {config_name: json.dumps(cfg).encode(), target: buf.getvalue()}.get(info.filename)
                dst.writestr(info, src.read(info) if data is None else data)
    return path


def test_pickled_weights_in_a_torch_export_archive_are_refused_before_loading(tmp_path):
    from hiposeg.export import load_inference_model

    marker = tmp_path / "PAYLOAD-RAN"
    model = pickled_weight_program(tmp_path / "w.pt2", marker)
    with pytest.raises(UserError, match="is not a plain tensor: torch would unpickle it"):
        load_inference_model(model)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# Checkpoints of another architecture
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, field", [
    ("--backbone", "resnet50", "model.backbone"),
    ("--output-stride", "8", "model.output_stride"),
    ("--set", "model.embed_dim=64", "model.embed_dim"),
])
def test_resume_with_another_architecture_names_the_setting(trained, flag, value, field):
    _, run = trained
    r = runner.invoke(app, ["train", "--resume", "last", "--out", str(run), flag, value, "--quiet", "--device", "cpu"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert squash("settings differ from the checkpoint") in squash(r.output) and field in r.output, r.output


def test_engine_refuses_a_checkpoint_of_another_architecture(trained, tmp_path):
    """`fit(cfg, resume=...)` (the API `ablate` uses) checks the architecture itself."""
    from hiposeg.config import validate_config
    from hiposeg.engine import fit
    from hiposeg.errors import UserError

    data, run = trained
    ckpt = run / "checkpoints" / "last.pt"
    saved = torch.load(ckpt, weights_only=True)["config"]
    saved["model"]["output_stride"] = 8
    saved["run"]["out"] = str(tmp_path / "other")
    with pytest.raises(UserError, match=r"has model.output_stride=16, but the configuration asks for 8"):
        fit(validate_config(saved), resume=ckpt)


def test_eval_refuses_weights_that_do_not_match_the_recorded_architecture(trained, tmp_path):
    data, run = trained
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["config"]["model"]["backbone"] = "resnet50"  # resnet18 weights under a resnet50 label
    path = tmp_path / "relabelled.pt"
    torch.save(ckpt, path)
    r = runner.invoke(app, ["eval", str(path), "--data", str(data), "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert squash(f"{path} does not match its recorded architecture") in squash(r.output), r.output
    assert "resnet50" in r.output
