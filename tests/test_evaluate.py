"""`hiposeg eval`: a model's report equals the report of its saved predictions, and one
mixed-precision rule for training and evaluation."""

from __future__ import annotations

import json

from conftest import fails_with
from faults import train_args
from hiposeg.cli import app


def test_cli_train_then_eval_predictions_match_model(cli, tiny_data, tmp_path):
    out = tmp_path / "cli"
    r = cli.invoke(app, train_args(tiny_data, out, iters=6))
    assert r.exit_code == 0, r.output
    assert "mIoU" in r.output and str(out) in r.output
    preds = tmp_path / "preds"
    r = cli.invoke(app, ["eval", str(out), "--device", "cpu", "--workers", "0", "--mode", "whole",
                         "--save-predictions", str(preds), "--report", str(tmp_path / "model.json")])
    assert r.exit_code == 0, r.output
    assert len(list(preds.glob("*.png"))) == 4
    r = cli.invoke(app, ["eval", "--predictions", str(preds), "--data", str(tiny_data),
                         "--report", str(tmp_path / "preds.json")])
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "model.json").read_text())
    b = json.loads((tmp_path / "preds.json").read_text())
    assert a["levels"] == b["levels"]


def test_fp16_on_the_cpu_is_refused_by_train_and_eval_alike(tiny_data, tiny_run, tmp_path):
    """One mixed-precision rule (`evaluate.autocast`): fp16 needs CUDA. `eval` used to drop it
    silently on the CPU while `train` refused it; now both refuse, train before writing a file."""
    out = tmp_path / "run"
    fails_with(train_args(tiny_data, out, "--amp", "fp16", iters=6), "--amp fp16 needs a CUDA GPU",
               "Use --amp bf16 on the CPU, or --amp off.")
    assert not [p for p in out.rglob("*") if p.is_file() and p.name != ".hiposeg.lock"]
    _, run = tiny_run
    fails_with(["eval", run, "--amp", "fp16", "--device", "cpu", "--workers", "0", "--report", tmp_path / "r.json"],
               "--amp fp16 needs a CUDA GPU")
    assert not (tmp_path / "r.json").exists()

