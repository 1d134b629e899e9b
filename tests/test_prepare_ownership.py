"""Whose folder is --out: `prepare` (and `prepare synthetic`) write only into a new or empty folder
or one that provably holds a hiposeg prepared dataset; --overwrite removes only what hiposeg wrote
there; names read from a manifest or journal never reach outside --out; one process at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import fails_with, squash
from faults import kill, start, wait_for
from hiposeg.cli import app
from hiposeg.data.cityscapes import Cityscapes
from hiposeg.data.layout import JOURNAL_NAME
from hiposeg.data.prepare import prepare
from hiposeg.data.synthetic import generate
from hiposeg.errors import UserError
from hiposeg.lock import LOCK_NAME, DirectoryLock
from test_prepare_resume import make_raw

def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root` (hidden ones too): file bytes, link targets, folders. A lock file counts by
    its presence only: every command that takes the lock rewrites its holder record (pid, start time to
    the second), so a refusal after taking it changes those bytes, and nothing else may change."""
    found: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        found[rel] = (f"-> {os.readlink(p)}" if p.is_symlink() else "<dir>" if p.is_dir()
                      else "<lock file>" if p.name == LOCK_NAME and p.is_file() else p.read_bytes())
    return found


@pytest.fixture
def run(cli):
    """`run(*args)` -> (exit code, output) of `hiposeg ARGS --workers 1 -q`; never a traceback."""

    def invoke(*args: str | Path) -> tuple[int, str]:
        r = cli.invoke(app, [*map(str, args), "--workers", "1", "-q"])
        assert "Traceback" not in r.output, r.output
        return r.exit_code, r.output

    return invoke


def refused(args: tuple, folder: Path, *needles: str | Path) -> None:
    """The command exits 2 naming `needles`, and `folder` is byte-identical afterwards (no lock file either)."""
    before = snapshot(folder)
    fails_with([*args, "--workers", "1", "-q"], *needles)
    assert snapshot(folder) == before


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("city") / "raw"
    make_raw(root, 3, 2)
    return root


def project_folder(root: Path) -> Path:
    """A user's project that happens to have a manifest.json of its own."""
    (root / "src").mkdir(parents=True)
    (root / "src/main.py").write_text("print('hello')\n")
    (root / "paper.tex").write_text("\\documentclass{article}\n")
    (root / "manifest.json").write_text(json.dumps({"name": "my-project", "splits": {"train": {}}}))
    return root


@pytest.mark.parametrize("command", ["cityscapes", "synthetic"])
def test_a_folder_with_a_foreign_manifest_is_refused_even_with_overwrite(raw, tmp_path, command):
    project = project_folder(tmp_path / "project")
    args = ("prepare", "cityscapes", raw, "--out", project) if command == "cityscapes" else \
        ("prepare", "synthetic", "--out", project, "--train", "2", "--val", "1", "--size", "32")
    for extra in ((), ("--overwrite",)):
        refused((*args, *extra), project, project, "holds no hiposeg prepared dataset",
                'manifest.json: it has no "format": "hiposeg-prepared/1"', "even with --overwrite",
                "paper.tex", "Choose an empty or new folder")


def test_a_raw_folder_with_a_manifest_keeps_its_images(tmp_path):
    photos = tmp_path / "photos"
    (photos / "images").mkdir(parents=True)
    cv2.imwrite(str(photos / "images/a.png"), np.zeros((8, 8, 3), np.uint8))
    (photos / "manifest.json").write_text(json.dumps({"format": "hiposeg-prepared/1"}))  # the format alone is not enough
    refused(("prepare", "synthetic", "--out", photos, "--overwrite", "--train", "2", "--val", "1", "--size", "32"),
            photos, "holds no hiposeg prepared dataset", "it lacks")


def add_user_files(out: Path) -> dict[str, bytes]:
    files = {"notes.txt": b"mine", "train/fine/mine.png": b"not a label", "train/extra/x.txt": b"x",
             "val/images/photo.jpg": b"jpeg?", "val/coarse/.tmp-draft.txt": b"not hiposeg's temp file"}
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return files


def test_overwrite_removes_only_what_prepare_wrote(raw, tmp_path, run):
    out = tmp_path / "out"
    prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    written = {str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir()}
    mine = add_user_files(out)
    code, text = run("prepare", "cityscapes", raw, "--out", out, "--overwrite", "--copy")
    assert code == 0, text
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine
    assert "--overwrite kept 5 file(s)" in " ".join(text.split()) and "notes.txt" in text
    now = {str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir()}
    assert now == written | set(mine)  # the same outputs, remade (now copies), and the user's files
    assert not any(p.is_symlink() for p in (out / "train/images").iterdir())


def test_overwrite_of_a_synthetic_set_removes_only_what_it_wrote(tmp_path):
    out = tmp_path / "syn"
    generate(out, train=3, val=2, size=32, workers=1)
    mine = add_user_files(out)
    made = generate(out, train=2, val=1, size=32, seed=4, workers=1, overwrite=True)
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine
    assert made.kept == sorted(mine)
    assert sorted(p.name for p in (out / "train/images").iterdir()) == ["synthetic_train_00000.png",
                                                                         "synthetic_train_00001.png"]
    assert sorted(p.name for p in (out / "train/fine").iterdir()) == ["mine.png", "synthetic_train_00000.png",
                                                                       "synthetic_train_00001.png"]


def journal_with(out: Path, raw: Path, *records: dict) -> None:
    """A journal of a real run of `raw` into `out`, with `records` appended."""
    lines = (out / JOURNAL_NAME).read_text().splitlines()
    (out / JOURNAL_NAME).write_text("\n".join([*lines, *map(json.dumps, records)]) + "\n")


@pytest.mark.parametrize("escape", ["relative", "absolute"])
def test_split_names_in_a_journal_never_reach_outside_out(raw, tmp_path, escape, run):
    victim = tmp_path / "victim"
    for d in ("images", "fine", "coarse"):
        (victim / d).mkdir(parents=True)
        (victim / d / "keep.png").write_bytes(b"precious")
    out = tmp_path / "out"
    prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    split = "../victim" if escape == "relative" else str(victim)
    record = {"split": split, "stem": "keep", "src": [1, 2, 3, 4], "image": ["link", "/x/keep.png"],
              "image_name": "keep.png", "fine": [8, "0" * 64], "coarse": [8, "0" * 64],
              "pixels": {"fine": {}, "coarse": {}, "ignore": 0}, "unknown": {}}
    journal_with(out, raw, record)
    before = snapshot(victim)
    code, text = run("prepare", "cityscapes", raw, "--out", out)
    assert code == 2 and f"{out / JOURNAL_NAME},line7" in squash(text) and "notaplainfolderorfilename" in squash(text)
    code, text = run("prepare", "cityscapes", raw, "--out", out, "--overwrite")
    assert code == 0, text
    assert snapshot(victim) == before


@pytest.mark.parametrize("command", ["cityscapes", "synthetic"])
def test_split_names_in_a_manifest_never_reach_outside_out(raw, tmp_path, command):
    victim = tmp_path / "victim"
    for d in ("images", "fine", "coarse"):
        (victim / d).mkdir(parents=True)
        (victim / d / "synthetic_victim_00001.png").write_bytes(b"precious")
    out = tmp_path / "syn"
    generate(out, train=2, val=1, size=32, workers=1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["../victim"] = manifest["splits"]["train"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / JOURNAL_NAME).unlink(missing_ok=True)  # the manifest alone must then prove the folder is hiposeg's
    before = snapshot(victim)
    args = ("prepare", "cityscapes", raw, "--out", out) if command == "cityscapes" else \
        ("prepare", "synthetic", "--out", out, "--train", "2", "--val", "1", "--size", "32")
    refused((*args, "--overwrite"), out, "holds no hiposeg prepared dataset", "'../victim'",
            "are not plain folder names")
    assert snapshot(victim) == before


def test_an_edited_journal_record_is_named_not_a_traceback(raw, tmp_path):
    out = tmp_path / "out"
    prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    journal_with(out, raw, {"split": "train"}, [1, 2])
    with pytest.raises(UserError, match=r"line 7: not a record hiposeg writes \(stem None is not a plain"):
        prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    (out / JOURNAL_NAME).write_text((out / JOURNAL_NAME).read_text().replace('{"split": "train"}\n', ""))
    with pytest.raises(UserError, match=r"line 7: not a record hiposeg writes \(not a JSON object\)"):
        prepare(Cityscapes(), raw, out, workers=1, quiet=True)


def test_a_prepared_dataset_without_its_journal_is_not_cleared(raw, tmp_path):
    out = tmp_path / "out"
    prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    (out / JOURNAL_NAME).unlink()
    refused(("prepare", "cityscapes", raw, "--out", out, "--overwrite"), out,
            "without its journal", "cannot tell which of the files there it wrote", "Remove")


def test_a_second_prepare_started_at_the_same_moment_is_refused_naming_the_first(raw, tmp_path, run):
    """The first run stalls while it writes its journal's first line (the moment the old code had
    already written hierarchy.json, and the second run called the folder foreign). The second is
    refused naming the first; once the first is killed, its lock is free and a rerun completes."""
    out, ready, log = tmp_path / "out", tmp_path / "stalled", tmp_path / "log.txt"
    proc = start(["prepare", "cityscapes", str(raw), "--out", str(out), "--workers", "1", "-q"], log,
                 inject=["stall-write", JOURNAL_NAME, "1", "10", str(ready)])
    try:
        wait_for(ready.exists, proc, log, "the journal write to stall")
        before = snapshot(out)
        code, text = run("prepare", "cityscapes", raw, "--out", out)
        assert code == 2, text
        assert f"prepareddatasetfolder{squash(str(out))}isinusebyanotherhiposegprocess(pid{proc.pid}" in squash(text)
        code, text = run("prepare", "synthetic", "--out", out, "--overwrite", "--train", "2", "--val", "1")
        assert code == 2 and f"(pid{proc.pid}" in squash(text), text
        assert snapshot(out) == before
    finally:
        kill(proc)
    code, text = run("prepare", "cityscapes", raw, "--out", out)
    assert code == 0, text
    assert (out / "manifest.json").is_file()


FORKED_HOLDER = textwrap.dedent("""
    import os, sys, time
    from hiposeg.lock import DirectoryLock
    DirectoryLock(sys.argv[1], "prepared dataset folder").acquire()
    if os.fork() == 0:  # a worker process forked while the lock is held (as a process pool does)
        print(os.getpid(), flush=True)  # running: the fork handlers are done
        time.sleep(60)
        os._exit(0)
    os._exit(0)  # the owner dies (as if killed); its worker lives on
""")


def test_a_worker_forked_by_the_owner_does_not_keep_the_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", FORKED_HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    worker = int(holder.stdout.readline())  # the worker keeps the pipe open: read the line, not to the end
    holder.wait(timeout=60)
    holder.stdout.close()
    try:
        DirectoryLock(out, "prepared dataset folder").acquire().release()
    finally:
        os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("link", ["split folder", "journal", "lock file"])
def test_symlinks_in_out_never_lead_writes_outside_it(raw, tmp_path, link, run):
    """A link inside a hiposeg folder that points elsewhere: hiposeg refuses it rather than write
    (or append, or truncate) through it; the target is untouched."""
    out, victim = tmp_path / "out", tmp_path / "victim"
    prepare(Cityscapes(), raw, out, workers=1, quiet=True, limit=1)
    victim.mkdir()
    if link == "split folder":  # where a user put the split on another disk, say
        for d in ("images", "fine", "coarse"):
            (victim / d).mkdir()
            (victim / d / "city1_000001_000019.png").write_bytes(b"precious")
        needles = [out / "train", "leads outside --out"]
        os.rename(out / "train", tmp_path / "train.old")
        os.symlink(victim, out / "train")
    else:
        name = JOURNAL_NAME if link == "journal" else ".hiposeg.lock"
        (victim / name).write_text((out / name).read_text())
        (out / name).unlink()
        os.symlink(victim / name, out / name)
        needles = [out / name, "is a symlink" if link == "journal" else "is a symbolic link"]
    before = snapshot(victim)
    code, text = run("prepare", "cityscapes", raw, "--out", out)
    assert code == 2, text
    for n in needles:
        assert squash(str(n)) in squash(text), (n, text)
    assert snapshot(victim) == before
    if link == "split folder":
        code, text = run("prepare", "synthetic", "--out", tmp_path / "syn", "--train", "2", "--val", "1")
        assert code == 0, text
        os.symlink(victim, tmp_path / "syn/val.new")
        os.rename(tmp_path / "syn/val", tmp_path / "val.old")
        os.rename(tmp_path / "syn/val.new", tmp_path / "syn/val")
        code, text = run("prepare", "synthetic", "--out", tmp_path / "syn", "--train", "2", "--val", "1", "--seed", "3",
                         "--overwrite")
        assert code == 2 and "leadsoutside--out" in squash(text), text
        assert snapshot(victim) == before
