"""An output folder that cannot be written (read-only file system, full disk) ends `prepare` and
`prepare synthetic` in one clear message naming the folder or file and the fix: no traceback, no
partial file, and a rerun on a writable disk completes.

The tests run as root, for whom permission bits do not stop writes, so a read-only file system is
injected: every call that would create, write, rename or remove something under a folder fails with
EROFS, as on a read-only mount (the same calls the kernel would refuse)."""

from __future__ import annotations

import builtins
import errno
import json
import os
from pathlib import Path

import pytest

from conftest import squash
from faults import install_full_disk
from hiposeg.cli import app
from hiposeg.data.cityscapes import Cityscapes
from hiposeg.data.layout import JOURNAL_NAME
from hiposeg.data.prepare import prepare
from test_prepare_resume import make_raw, manifest_body, outputs


def install_read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Writes under `root` (the folder itself included) fail with OSError(EROFS, path)."""
    top = os.path.abspath(root)

    def check(path: object) -> None:
        p = os.path.abspath(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if p == top or p.startswith(top + os.sep):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), p)

    def guard(fn, *positions: int):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            for i in positions:
                if i < len(args):
                    check(args[i])
            return fn(*args, **kwargs)
        return wrapped

    real_os_open, real_open = os.open, builtins.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & writing:
            check(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    for name, positions in (("mkdir", (0,)), ("symlink", (1,)), ("replace", (0, 1)), ("rename", (0, 1)),
                            ("unlink", (0,)), ("remove", (0,)), ("rmdir", (0,))):
        monkeypatch.setattr(os, name, guard(getattr(os, name), *positions))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("city") / "raw"
    make_raw(root, 3, 2)
    return root


SYNTHETIC = ("prepare", "synthetic", "--train", "2", "--val", "1", "--size", "32")


@pytest.mark.parametrize("command", ["cityscapes", "synthetic"])
def test_a_read_only_output_folder_is_one_clear_error(raw, tmp_path, monkeypatch, command, cli):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "data"
    args = ["prepare", "cityscapes", str(raw)] if command == "cityscapes" else list(SYNTHETIC)
    args += ["--out", str(out), "--workers", "1", "-q"]
    install_read_only(monkeypatch, disk)
    r = cli.invoke(app, args)
    monkeypatch.undo()
    assert r.exit_code == 2, (r.output, r.exception)
    assert squash(f"cannot use prepared dataset folder {out}: Read-only file system") in squash(r.output), r.output
    assert "Choose a folder you can write to" in " ".join(r.output.split())
    assert tree(disk) == []
    r = cli.invoke(app, args)  # the same command on a writable disk
    assert r.exit_code == 0, r.output


def test_a_dataset_on_a_disk_that_became_read_only_is_one_clear_error(raw, tmp_path, monkeypatch, cli):
    out = tmp_path / "data"
    args = ["prepare", "cityscapes", str(raw), "--out", str(out), "--workers", "1", "-q"]
    assert cli.invoke(app, [*args, "--limit", "1"]).exit_code == 0
    before = outputs(out)
    install_read_only(monkeypatch, out)
    r = cli.invoke(app, args)
    monkeypatch.undo()
    assert r.exit_code == 2, (r.output, r.exception)
    assert squash(f"prepared dataset folder {out}: Read-only file system") in squash(r.output), r.output
    assert outputs(out) == before


@pytest.mark.parametrize("name", ["manifest.json", "hierarchy.json"])
def test_full_disk_while_writing_the_manifest_or_hierarchy(raw, tmp_path, monkeypatch, name, cli):
    """The files around the conversion: hierarchy.json first, manifest.json last (its presence means
    "done", so a failed write must leave none)."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["prepare", "cityscapes", str(raw), "--workers", "1", "-q"]
    assert cli.invoke(app, [*args, "--out", str(ref)]).exit_code == 0
    seen = install_full_disk(monkeypatch, name, budget=10)
    r = cli.invoke(app, [*args, "--out", str(out)])
    monkeypatch.undo()
    assert seen["failed"] == 1, "the full-disk fault was never reached"
    assert r.exit_code == 2, (r.output, r.exception)
    for needle in (f"cannot write {out / name}: No space left on device", "Free disk space",
                   "no partial file is left", "rerun the same command to resume"):
        assert squash(needle) in squash(r.output), (needle, r.output)
    assert not (out / "manifest.json").exists() and not [p for p in tree(out) if ".tmp-" in p]
    r = cli.invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert outputs(out) == outputs(ref) and manifest_body(out) == manifest_body(ref)


def test_full_disk_while_making_the_synthetic_set(tmp_path, monkeypatch, cli):
    out = tmp_path / "syn"
    args = [*SYNTHETIC, "--out", str(out), "--workers", "1", "-q"]
    seen = install_full_disk(monkeypatch, "synthetic_train_00001.png", budget=50)
    r = cli.invoke(app, args)
    monkeypatch.undo()
    assert seen["failed"] == 1
    assert r.exit_code == 2, (r.output, r.exception)
    assert squash(f"cannot write {out}/train") in squash(r.output) and "No space left on device" in r.output
    assert not (out / "manifest.json").exists() and not [p for p in tree(out) if ".tmp-" in p]
    r = cli.invoke(app, args)  # the interrupted build of the same set is made again
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").is_file()


def test_full_disk_while_preparing_keeps_finished_files_and_resumes(tmp_path, monkeypatch, cli):
    raw, ref, out = tmp_path / "raw", tmp_path / "ref", tmp_path / "out"
    make_raw(raw, 6, 2)
    prepare(Cityscapes(), raw, ref, workers=1, quiet=True)
    seen = install_full_disk(monkeypatch, "*.png", budget=30, nth=7)  # the 4th pair's fine map; then all full
    r = cli.invoke(app, ["prepare", "cityscapes", str(raw), "--out", str(out), "--workers", "1", "-q"])
    monkeypatch.undo()
    assert seen["failed"] >= 1, "the full-disk fault was never reached"
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    msg = squash(r.output)
    for needle in (str(out / "train" / "fine"), "No space left on device", "3 files finished so far are kept",
                   "rerun the same command to resume"):
        assert squash(needle) in msg, (needle, r.output)
    # the finished files are intact and recorded, nothing partial is left, no manifest claims "done"
    records = [json.loads(line) for line in (out / JOURNAL_NAME).read_text().splitlines()[1:]]
    assert len(records) == 3
    for rec in records:
        for level in ("fine", "coarse"):
            rel = Path(rec["split"]) / level / f"{rec['stem']}.png"
            assert (out / rel).read_bytes() == (ref / rel).read_bytes()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert not (out / "manifest.json").exists()
    # space freed: the same command finishes the job, byte-identical to an undisturbed run
    m = prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    assert m["_run"]["reused"] == 3 and m["_run"]["converted"] == 5
    assert outputs(out) == outputs(ref) and manifest_body(out) == manifest_body(ref)


def test_full_disk_while_journaling_a_finished_file(tmp_path, monkeypatch, cli):
    """The journal append fails (then the disk stays full): one clear error, and the rerun redoes
    exactly the files whose record was lost."""
    raw, ref, out = tmp_path / "raw", tmp_path / "ref", tmp_path / "out"
    make_raw(raw, 4, 1)
    prepare(Cityscapes(), raw, ref, workers=1, quiet=True)
    # the journal is opened twice: written with its header (atomically), then opened for appending;
    # the append file holds 3 records before the disk is full
    first_three = 3 * len((ref / JOURNAL_NAME).read_text().splitlines()[1]) + 3
    seen = install_full_disk(monkeypatch, JOURNAL_NAME, budget=first_three, nth=2)
    r = cli.invoke(app, ["prepare", "cityscapes", str(raw), "--out", str(out), "--workers", "1", "-q"])
    monkeypatch.undo()
    assert seen["failed"] == 1
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert squash(f"cannot write {out / JOURNAL_NAME}: No space left on device") in squash(r.output), r.output
    m = prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    assert m["_run"]["converted"] + m["_run"]["reused"] == 5 and m["_run"]["converted"] >= 2
    assert outputs(out) == outputs(ref)
