"""`export`, `predict` and `eval` never build the training model: run in a fresh interpreter, they
import neither the prototype branch (`hiposeg.prototypes`) nor the training wrapper with the
projection head (`hiposeg.models.training`)."""

from __future__ import annotations

import json
import subprocess
import sys

TRAINING_MODULES = ("hiposeg.prototypes", "hiposeg.models.training")


def test_export_predict_and_eval_import_no_training_code(tiny_run, tmp_path):
    data, run = tiny_run
    image = sorted((data / "val" / "images").iterdir())[0]
    commands = [["export", str(run), "--out", str(tmp_path / "model.pt")],
                ["predict", str(tmp_path / "model.pt"), str(image), "--out", str(tmp_path / "pred"), "--device", "cpu",
                 "--workers", "0", "-q"],
                ["eval", str(run), "--data", str(data), "--device", "cpu", "--workers", "0", "--mode", "whole",
                 "--report", str(tmp_path / "report.json")]]  # a training checkpoint, read for inference
    code = f"""
import json, sys
from typer.testing import CliRunner
from hiposeg.cli import app
for args in {commands!r}:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
print(json.dumps(sorted(m for m in sys.modules if m.startswith("hiposeg"))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "hiposeg.export" in loaded and "hiposeg.predict" in loaded  # the commands did run
    assert not set(TRAINING_MODULES) & set(loaded), loaded
