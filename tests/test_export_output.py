"""What `hiposeg export --out FILE` may leave at FILE: a verified model only. An export whose reload
differs beyond its format's tolerance is never published, a previous model there survives any
failure, and a file that is not a model hiposeg exported is never replaced."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import fails_with
from crafted import Payload
from hiposeg.cli import app
from hiposeg.export import detect_format, load_inference_model


class Shifted(torch.nn.Module):
    """The reloaded model with every logit moved by `shift` x the logits' scale max(1, max |logit|), the
    scale export's tolerances are relative to."""

    def __init__(self, module: torch.nn.Module, shift: float) -> None:
        super().__init__()
        self.module, self.shift = module, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        return y + self.shift * max(1.0, float(y.abs().max()))


def reload_shifted(monkeypatch, shift: float) -> None:  # type: ignore[no-untyped-def]
    """Make the reload that export checks differ from the reference by `shift` (relative)."""
    import hiposeg.export as export

    real_load = export.load_inference_model

    def shifted_load(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        loaded = real_load(path, *args, **kwargs)
        loaded.module = Shifted(loaded.module, shift)
        return loaded

    monkeypatch.setattr(export, "load_inference_model", shifted_load)


def test_an_export_that_fails_its_check_is_never_published(tiny_run, tmp_path, monkeypatch, cli):
    """The reload differs by half the logits' scale: the exit is 2 with the file, the difference and the
    tolerance (0 for the hiposeg format) named; --out is not written (a previous model there is
    kept byte for byte) and no temporary file is left."""
    _, run = tiny_run
    out = tmp_path / "model.pt"
    assert cli.invoke(app, ["export", str(run), "--out", str(out)]).exit_code == 0
    previous = out.read_bytes()
    reload_shifted(monkeypatch, 0.5)
    fails_with(["export", run, "--out", out], out.name, "was not written", "differ from the training model's by up to",
               "(tolerance 0)")
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    fails_with(["export", run, "--out", tmp_path / "new.pt"], "was not written")
    assert not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("shift, published", [(3e-5, False), (3e-6, True)])
def test_a_program_is_published_only_within_its_tolerance(tiny_run, exported_models, tmp_path, monkeypatch, cli,
                                                          shift, published):
    """torch-export programs may differ from the reference by 1e-5 of the logits' scale (README): a
    reload off by 3e-5 is refused, one off by 3e-6 is published. (The program written is the one the
    fixture exported from the same checkpoint, to spare a second trace.)"""
    from hiposeg.export import torch_export

    _, run = tiny_run
    out = tmp_path / "model.pt2"
    monkeypatch.setattr(torch_export, "write",
                        lambda segmenter, meta, staged: shutil.copy(exported_models["torch-export"], staged))
    reload_shifted(monkeypatch, shift)
    r = cli.invoke(app, ["export", str(run), "--out", str(out), "--format", "torch-export"])
    assert (r.exit_code == 0) == published, r.output
    assert out.exists() == published
    if not published:
        assert "failed its check" in r.output and "Traceback" not in r.output


def test_export_never_replaces_a_file_it_did_not_write(tiny_run, tmp_path):
    """A text file, a training checkpoint, a file whose unpickling would run code, a named pipe and a
    dangling link at --out: each refused before any work, naming it, and left as it was (the pickle
    never runs, the pipe is never opened)."""
    _, run = tiny_run
    marker = tmp_path / "PAYLOAD-RAN"
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    ckpt = Path(shutil.copy(run / "checkpoints" / "best.pt", tmp_path / "best.pt"))
    evil = tmp_path / "evil.pt"
    torch.save({"format": "hiposeg-model/1", "x": Payload(marker)}, evil)
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    link = tmp_path / "link.pt"
    link.symlink_to(tmp_path / "nowhere.pt")
    for out in (notes, ckpt, evil, fifo):
        before = out.read_bytes() if out.is_file() else None
        fails_with(["export", run, "--out", out], f"--out {out} exists and is not a model written by `hiposeg export`",
                   "Choose another --out")
        assert (out.read_bytes() if out.is_file() else None) == before
    assert fifo.is_fifo() and not marker.exists()
    fails_with(["export", run, "--out", link], f"--out {link} exists and is not a model")
    assert link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "evil.pt", "link.pt", "notes.txt", "pipe.pt"]


def test_a_previous_hiposeg_model_in_any_format_is_replaced(tiny_run, exported_models, tmp_path, cli):
    _, run = tiny_run
    out = Path(shutil.copy(exported_models["torch-export"], tmp_path / "model.pt2"))
    r = cli.invoke(app, ["export", str(run), "--out", str(out), "--format", "hiposeg"])
    assert r.exit_code == 0, r.output
    assert detect_format(out) == "torch" and load_inference_model(out).source == "hiposeg"


def test_export_of_a_corrupt_or_missing_checkpoint_is_a_clear_error(tiny_run, tmp_path):
    _, run = tiny_run
    data = (run / "checkpoints" / "last.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 3])
    for source, words in [(bad, "corrupt"), (tmp_path / "nope", "no such run directory"),
                          (tmp_path, "no checkpoint in run directory")]:
        fails_with(["export", source, "--out", tmp_path / "m.pt"], words)
    assert not (tmp_path / "m.pt").exists()
    fails_with(["export", run, "--out", tmp_path / "m.pt", "--format", "tflite"], "hiposeg, torch-export, onnx")


def test_onnx_without_the_extra_names_it(tiny_run, tmp_path, monkeypatch):
    _, run = tiny_run
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("onnx") else real(name, *a))
    fails_with(["export", run, "--out", tmp_path / "m.onnx", "--format", "onnx"], "hiposeg[onnx]")


def test_export_never_writes_into_a_dataset_a_runs_checkpoints_or_a_run_another_process_holds(
        tiny_run, exported_models, tmp_path, cli):
    """Beyond the file at --out: nothing is written inside a prepared dataset (not even over a model
    hiposeg exported there, nor a new file), nor into a run's checkpoints/ folder (its own last.pt
    included), nor into a run directory while another process holds it (a `train` writing it). A run
    directory nobody holds takes the model."""
    from hiposeg.lock import DirectoryLock

    data, trained = tiny_run
    dataset, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data, dataset, symlinks=True)
    shutil.copytree(trained, run)
    shutil.copy(exported_models["hiposeg"], dataset / "model.pt")
    before = {d: digest(d) for d in (dataset, run)}
    for out in (dataset / "model.pt", dataset / "val" / "new.pt"):
        fails_with(["export", run, "--out", out], f"--out {out} is inside the prepared dataset {dataset}")
    fails_with(["export", run, "--out", run / "checkpoints" / "last.pt"], "is not a model written by `hiposeg export`")
    fails_with(["export", run, "--out", run / "checkpoints" / "model.pt"],
               f"--out {run / 'checkpoints' / 'model.pt'} is in the checkpoints/ folder of the run directory {run}")
    with DirectoryLock(run, "run directory"):  # a `train` into that run (here: this process) holds it
        fails_with(["export", run, "--out", run / "model.pt"],
                   f"run directory {run} is in use by another hiposeg process (pid {os.getpid()}")
    assert {d: digest(d) for d in (dataset, run)} == before
    assert cli.invoke(app, ["export", str(run), "--out", str(run / "model.pt")]).exit_code == 0
    assert load_inference_model(run / "model.pt").source == "hiposeg"


def digest(root: Path) -> dict[str, bytes]:
    """Every file under `root` (links not followed) with its bytes, but the lock file's holder record."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != ".hiposeg.lock"}
