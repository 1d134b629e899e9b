"""Reliability: the disk fills up in the middle of a write.

The fault is a file whose writes raise OSError(ENOSPC) once a byte budget is spent, built like the
file `open()` returns (a BufferedWriter over a raw file), and handed out by `os.fdopen` for the
targeted file only (tests/faults.py: `install_full_disk`). So the error reaches torch.save's zip
writer exactly where a real full disk would raise it. A full disk while `hiposeg prepare` writes
its PNGs or journal is tested in tests/test_prepare_output.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from faults import install_full_disk, load_checkpoint, make_tiny_data, one_thread, temp_files, train_args  # noqa: F401
from hiposeg.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def squash(text: str) -> str:
    """Rich wraps long lines (even inside paths): compare with all whitespace removed."""
    return "".join(text.split())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("disk") / "synthetic")


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    snapshot: dict[str, str] = {}

    def before_second_write() -> None:  # the checkpoint the failed write must not damage
        snapshot["sha"] = hashlib.sha256(last.read_bytes()).hexdigest()

    # iteration 2 writes last.pt; iteration 4's write runs out of space after 5 MB
    seen = install_full_disk(monkeypatch, "last.pt", budget=5 << 20, nth=2, on_fault=before_second_write)
    r = runner.invoke(app, train_args(tiny, out, iters=6, ckpt_every=2))
    monkeypatch.undo()
    assert seen["failed"] == 1, "the full-disk fault was never reached"
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "enforce fail" not in r.output
    msg = squash(r.output)
    for needle in (f"could not write checkpoint {last}", "No space left on device", "previous checkpoint",
                   "is intact", "--resume"):
        assert squash(needle) in msg, (needle, r.output)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == snapshot["sha"]
    assert load_checkpoint(last)["iteration"] == 2
    assert not temp_files(last.parent), "the partial checkpoint was left behind"


def test_full_disk_while_logging_metrics_is_one_clear_error(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = install_full_disk(monkeypatch, "metrics.jsonl", budget=0)
    r = runner.invoke(app, train_args(tiny, out, iters=4, ckpt_every=2))
    monkeypatch.undo()
    assert seen["failed"] == 1
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "no space left on the device while writing" in r.output and str(out) in squash(r.output)
    assert squash(f"hiposeg train --resume --out {out}") in squash(r.output)


def test_full_disk_during_an_export_is_one_clear_error_and_publishes_nothing(tiny_run, tmp_path, monkeypatch):
    """torch.export's zip writer meets ENOSPC: exit 2 naming --out and the cause, no traceback, no file
    at --out and no temporary file beside it."""
    _, run = tiny_run
    out = tmp_path / "model.pt2"
    seen = install_full_disk(monkeypatch, "*model*.pt2", budget=1 << 20)
    r = runner.invoke(app, ["export", str(run), "--out", str(out), "--format", "torch-export"])
    monkeypatch.undo()
    assert seen["failed"] >= 1, "the full-disk fault was never reached"
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert squash(f"could not write {out}: No space left on device") in squash(r.output), r.output
    assert list(tmp_path.iterdir()) == []
