"""What `hiposeg export --out FILE` may leave at FILE: a verified model only. An export whose reload
differs beyond its format's tolerance is never published, and a previous model there survives any
failure."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from conftest import fails_with
from hiposeg.cli import app


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
