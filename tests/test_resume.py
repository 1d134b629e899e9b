"""Resuming a run (`--resume`): an interrupted run ends as an uninterrupted one, a resumed run is
the same experiment, and only a checkpoint that fits (hierarchy, architecture, hiposeg's format) is
continued. The run directory's rules (whose run, which checkpoint): tests/test_run_directory.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import fails_with, squash, tiny_config
from faults import StopAfter, train_args
from hiposeg import checkpoint
from hiposeg.cli import app
from hiposeg.engine import fit
from hiposeg.errors import UserError


def load_plain(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_after_interruption_equals_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    import hiposeg.engine as engine

    full = fit(tiny_config(tiny_data, tmp_path / "full"))
    assert full.iterations == 8

    monkeypatch.setattr(engine, "StopSignal", lambda: StopAfter(5))
    part = fit(tiny_config(tiny_data, tmp_path / "part"))
    assert part.interrupted and part.iterations == 5
    assert json.loads((tmp_path / "part" / "status.json").read_text())["state"] == "interrupted"
    monkeypatch.undo()

    done = fit(tiny_config(tiny_data, tmp_path / "part"), resume=tmp_path / "part" / "checkpoints" / "last.pt")
    assert done.iterations == 8 and not done.interrupted
    a = load_plain(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_plain(tmp_path / "part" / "checkpoints" / "last.pt")
    for part_name in ("model", "projection", "memory"):
        assert a[part_name].keys() == b[part_name].keys()
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), f"{part_name}.{k} differs after resume"
    assert done.report["levels"]["fine"]["mIoU"] == pytest.approx(full.report["levels"]["fine"]["mIoU"])


def test_an_interrupted_run_says_once_where_its_checkpoint_is_and_how_to_resume(cli, tiny_data, tmp_path, monkeypatch):
    """One message (it was said twice, in two wordings: by the training loop and by the command)."""
    import hiposeg.engine as engine

    out = tmp_path / "run"
    monkeypatch.setattr(engine, "StopSignal", lambda: StopAfter(3))
    r = cli.invoke(app, [a for a in train_args(tiny_data, out, iters=6) if a != "--quiet"])
    assert r.exit_code == 130, r.output
    said = squash(r.output)
    assert said.count("--resume") == 1 and said.count("atiteration3") == 1, r.output
    assert squash(f"interrupted at iteration 3; checkpoint written to {out / 'checkpoints' / 'last.pt'}; resume with "
                  f"`hiposeg train --resume --out {out}`") in said, r.output


def test_existing_run_needs_resume_and_resume_rejects_changed_settings(cli, tiny_data, tmp_path):
    out = tmp_path / "run"
    assert cli.invoke(app, train_args(tiny_data, out, iters=6)).exit_code == 0
    fails_with(train_args(tiny_data, out, iters=6), "already holds a checkpoint", f"--resume --out {out}")
    fails_with(["train", "--resume", "last", "--out", out, "--lr", "0.5", "--quiet"], "optim.lr")
    fails_with(["train", "--resume", "last", "--out", out, "--seed", "7", "--quiet"], "run.seed")  # another data stream
    fails_with(["train", "--resume", "last", "--out", tmp_path / "nothing", "--quiet"], "nothing to resume")
    # a finished run resumed: nothing left to do, finishes immediately with its report
    r = cli.invoke(app, ["train", "--resume", "last", "--out", str(out), "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output


def test_corrupt_and_foreign_checkpoints_are_refused(cli, tiny_data, tmp_path):
    out = tmp_path / "run"
    assert cli.invoke(app, train_args(tiny_data, out, iters=6)).exit_code == 0
    # another hierarchy: same images, one class renamed
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other, symlinks=True)
    h = json.loads((other / "hierarchy.json").read_text())
    h["levels"][0]["classes"][0]["name"] += "-renamed"
    (other / "hierarchy.json").write_text(json.dumps(h))
    from hiposeg.hierarchy import Hierarchy

    manifest = json.loads((other / "manifest.json").read_text())  # a consistent dataset of another hierarchy
    manifest["hierarchy"]["sha256"] = Hierarchy.from_file(other / "hierarchy.json").sha256
    (other / "manifest.json").write_text(json.dumps(manifest))
    ours, theirs = (Hierarchy.from_file(d / "hierarchy.json").sha256[:12] for d in (tiny_data, other))
    assert ours != theirs  # same name 'synthetic': only the digests tell them apart
    last = out / "checkpoints" / "last.pt"
    for args, what in [(["eval", out, "--data", other, "--device", "cpu", "--workers", "0"], out),  # one check for both
                       (["train", "--resume", last, "--data", other, "--quiet", "--device", "cpu"], f"checkpoint {last}")]:
        fails_with(args, f"{what} was trained with hierarchy 'synthetic' (sha256 {ours}), but {other} uses "
                         f"'synthetic' ({theirs}): a different class tree")
    # into a new folder: refused before the folder is made (was: after it was claimed, in the training process)
    fails_with(["train", "--resume", last, "--data", other, "--out", tmp_path / "new", "--quiet", "--device", "cpu"],
               "a different class tree")
    assert not (tmp_path / "new").exists()
    # truncated file
    bad = tmp_path / "bad.pt"
    data = last.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    fails_with(["eval", bad, "--device", "cpu"], f"checkpoint {bad} is corrupt or truncated")


def test_checkpoint_loader_refuses_non_hiposeg_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"format": "something-else"}, p)
    with pytest.raises(UserError, match="is not a hiposeg-checkpoint/1 file"):
        checkpoint.load(p)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"is empty \(0 bytes\)"):
        checkpoint.load(tmp_path / "empty.pt")


def test_a_checkpoint_from_before_loss_momentum_was_renamed_resumes_and_exports(cli, tiny_run, tmp_path):
    """Checkpoints written before `loss.momentum` became `loss.memory_momentum` hold the old name in
    their saved config: `--resume` and `export` read it (with a deprecation note), and the
    checkpoints the resumed run writes hold the new name."""
    _, run = tiny_run
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    for name in ("last", "best"):
        ck = load_plain(old / "checkpoints" / f"{name}.pt")
        loss = ck["config"]["loss"]
        ck["config"]["loss"] = {("momentum" if k == "memory_momentum" else k): v for k, v in loss.items()}
        torch.save(ck, old / "checkpoints" / f"{name}.pt")
    note = "names loss.momentum, which is now loss.memory_momentum"
    r = cli.invoke(app, ["export", str(old), "--out", str(tmp_path / "model.pt")])
    assert r.exit_code == 0, r.output
    assert squash(note) in squash(r.output) and load_plain(tmp_path / "model.pt")["state_dict"]
    r = cli.invoke(app, ["train", "--resume", "last", "--out", str(old), "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert squash(f"checkpoint {old / 'checkpoints' / 'last.pt'} {note}") in squash(r.output)
    resumed = load_plain(old / "checkpoints" / "last.pt")["config"]["loss"]
    assert resumed["memory_momentum"] == 0.9 and "momentum" not in resumed
