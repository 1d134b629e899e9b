"""The shared prepare machinery: resume after a kill, temp files, verification against the journal,
--overwrite, --limit, --copy, and the output-folder safety rules."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from faults import kill, start, wait_for
import hiposeg.data.convert as convert
import hiposeg.data.pool as pool
from hiposeg.data.cityscapes import Cityscapes
from hiposeg.data.layout import JOURNAL_NAME
from hiposeg.data.prepare import prepare
from hiposeg.errors import UserError
from hiposeg.lock import LOCK_NAME


def make_raw(raw: Path, n_train: int, n_val: int, h: int = 32, w: int = 64) -> None:
    """A Cityscapes tree: constant-colour images, block label maps over the ids 0..33."""
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 90, np.uint8)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            city = f"city{i % 3}"
            stem = f"{city}_{i:06d}_000019"
            d_img, d_gt = raw / "leftImg8bit" / split / city, raw / "gtFine" / split / city
            d_img.mkdir(parents=True, exist_ok=True)
            d_gt.mkdir(parents=True, exist_ok=True)
            cells = rng.integers(0, 34, (h // 16, w // 16), dtype=np.uint8)
            cv2.imwrite(str(d_gt / f"{stem}_gtFine_labelIds.png"), np.kron(cells, np.ones((16, 16), np.uint8)))
            cv2.imwrite(str(d_img / f"{stem}_leftImg8bit.png"), img)


def outputs(out: Path) -> dict[str, bytes | str]:
    """Every output file's bytes (links: their target), keyed by relative path; no temp files (the lock
    file records who held it, so it is left out too)."""
    files: dict[str, bytes | str] = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if p.is_symlink():
            files[rel] = os.readlink(p)
        elif p.is_file() and p.name not in (JOURNAL_NAME, "manifest.json", LOCK_NAME):
            files[rel] = p.read_bytes()
    return files


def manifest_body(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    m.pop("created")
    return m


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(raw tree with 7 train + 3 val frames, its reference output prepared in one go)."""
    base = tmp_path_factory.mktemp("small")
    make_raw(base / "raw", 7, 3)
    prepare(Cityscapes(), base / "raw", base / "ref", workers=1, quiet=True)
    return base / "raw", base / "ref"


def test_interrupted_run_resumes_to_identical_outputs(small, tmp_path, monkeypatch):
    raw, ref = small
    real = convert.convert_item
    calls = {"n": 0}

    def interrupted_on_third(job, item):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third file is in flight
        return real(job, item)

    monkeypatch.setattr(convert, "convert_item", interrupted_on_third)
    with pytest.raises(UserError, match="interrupted after 2 of 10 files"):
        prepare(Cityscapes(), raw, tmp_path / "out", workers=1, quiet=True)
    assert not (tmp_path / "out/manifest.json").exists()
    monkeypatch.setattr(convert, "convert_item", real)
    m = prepare(Cityscapes(), raw, tmp_path / "out", workers=1, quiet=True)
    assert m["_run"] == {**m["_run"], "converted": 8, "reused": 2}
    assert outputs(tmp_path / "out") == outputs(ref)
    assert manifest_body(tmp_path / "out") == manifest_body(ref)


def test_leftovers_of_a_killed_run_are_cleaned_and_redone(small, tmp_path):
    raw, ref = small
    out = tmp_path / "out"
    prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    fine = sorted((out / "train/fine").iterdir())
    (out / "train/fine" / ".tmp-city0_000000_000019.png.x1y2z3w4").write_bytes(b"\x89PNG half")  # write in flight
    (out / "val/images" / ".tmp-city0_000000_000019.png.4242").symlink_to("/nonexistent")  # link in flight
    with open(fine[1], "ab") as f:
        f.write(b"garbage")  # corrupted output: size no longer matches the journal
    sorted((out / "val/coarse").iterdir())[0].unlink()  # missing output
    with open(out / JOURNAL_NAME, "a") as f:
        f.write('{"split": "train", "stem": "cut sh')  # a record cut short by the kill
    (out / "manifest.json").unlink()
    m = prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    assert m["_run"]["converted"] == 2 and m["_run"]["reused"] == 8
    assert outputs(out) == outputs(ref)
    assert not list(out.rglob(".tmp-*"))
    assert manifest_body(out) == manifest_body(ref)


def test_output_changed_to_other_bytes_of_the_same_size_is_redone(small, tmp_path):
    """The size matches the journal, the sha256 does not: only that file is converted again."""
    raw, ref = small
    out = tmp_path / "out"
    prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    altered = sorted((out / "train/coarse").iterdir())[2]
    original = altered.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    altered.write_bytes(bytes(flipped))
    others = [p for p in out.rglob("*.png") if not (p.parent.parent.name == "train" and p.name == altered.name)]
    assert len(others) == 10 * 3 - 3  # every file but the altered item's image, fine and coarse
    before = {p: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in others}
    m = prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    assert m["_run"]["converted"] == 1 and m["_run"]["reused"] == 9
    assert altered.read_bytes() == original
    assert {p: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in others} == before  # the other items were kept
    assert outputs(out) == outputs(ref)


def test_changed_raw_label_is_prepared_again(tmp_path):
    make_raw(tmp_path / "raw", 3, 1)
    prepare(Cityscapes(), tmp_path / "raw", tmp_path / "out", workers=1, quiet=True)
    label = sorted((tmp_path / "raw/gtFine/train").rglob("*_labelIds.png"))[0]
    cv2.imwrite(str(label), np.full((32, 64), 7, np.uint8))  # all road now
    m = prepare(Cityscapes(), tmp_path / "raw", tmp_path / "out", workers=1, quiet=True)
    assert m["_run"]["converted"] == 1
    stem = label.name.replace("_gtFine_labelIds.png", "")
    assert (cv2.imread(str(tmp_path / "out/train/fine" / f"{stem}.png"), cv2.IMREAD_UNCHANGED) == 0).all()


@pytest.mark.slow
def test_process_killed_mid_run_resumes_to_identical_outputs(tmp_path):
    """SIGKILL the whole `hiposeg prepare` process group (main + workers) mid-run, then rerun."""
    raw = tmp_path / "raw"
    make_raw(raw, 40, 8, h=1024, w=2048)  # Cityscapes-sized, so the run lasts long enough to be cut
    prepare(Cityscapes(), raw, tmp_path / "ref", workers=1, quiet=True)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hiposeg", "prepare", "cityscapes", str(raw), "--out", str(out), "--workers", "2", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    journal = out / JOURNAL_NAME
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 4:  # header + 3 finished files
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = journal.read_text().count("\n") - 1
    assert 3 <= done_before < 48
    m = prepare(Cityscapes(), raw, out, workers=2, quiet=True)
    assert m["_run"]["reused"] >= done_before and m["_run"]["converted"] + m["_run"]["reused"] == 48
    assert outputs(out) == outputs(tmp_path / "ref")
    assert manifest_body(out) == manifest_body(tmp_path / "ref")


@pytest.mark.slow
def test_prepare_killed_mid_png_write_redoes_only_unrecorded_files(tmp_path):
    """SIGKILL while a label PNG is half-written (pinned inside the write by tests/faults.py): no
    partial PNG under a final name, the rerun converts exactly the files the journal had not
    recorded, and the outputs are byte-identical. The kill point is drawn from a seeded RNG."""
    rng = random.Random(7)
    raw, ref, out = tmp_path / "raw", tmp_path / "ref", tmp_path / "out"
    make_raw(raw, 12, 4)
    prepare(Cityscapes(), raw, ref, workers=1, quiet=True)
    total = 16

    # Each of the 2 worker processes stalls on its n-th PNG after 40 bytes; then SIGKILL all.
    nth, ready, log = rng.randint(3, 6), tmp_path / "stalled", tmp_path / "log.txt"
    proc = start(["prepare", "cityscapes", str(raw), "--out", str(out), "--workers", "2", "-q"], log,
                 inject=["stall-write", "*.png", str(nth), "40", str(ready)])
    wait_for(ready.exists, proc, log, "a PNG write to stall")
    kill(proc)

    assert not (out / "manifest.json").exists()
    journal = (out / JOURNAL_NAME).read_text().split("\n")[1:-1]  # complete records after the header
    recorded = {(r["split"], r["stem"]) for r in map(json.loads, journal)}
    assert 0 < len(recorded) < total
    # No partial PNG under a final name: every visible output is complete (= the reference bytes).
    pngs = [p for p in out.rglob("*.png") if not p.name.startswith(".tmp-")]
    for p in pngs:
        assert p.read_bytes() == (ref / p.relative_to(out)).read_bytes(), f"partial or wrong output {p}"
    torn = [p for p in out.rglob(".tmp-*") if p.is_file() and not p.is_symlink()]
    assert any(p.stat().st_size == 40 for p in torn), "the kill did not land inside a PNG write"
    mtimes = {p: p.stat().st_mtime_ns for p in pngs}

    m = prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    # Only what the journal had not recorded is converted again; recorded outputs are not touched.
    assert m["_run"]["reused"] == len(recorded) and m["_run"]["converted"] == total - len(recorded)
    rewritten = {p for p, t in mtimes.items() if p.stat().st_mtime_ns != t}
    assert all((p.parent.parent.name, p.stem) not in recorded for p in rewritten)
    assert outputs(out) == outputs(ref)
    assert manifest_body(out) == manifest_body(ref)
    assert not list(out.rglob(".tmp-*"))


def test_rerun_with_other_options_needs_overwrite(small, tmp_path):
    raw, ref = small
    out = tmp_path / "out"
    prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    with pytest.raises(UserError, match="different settings: copy: was False, now True") as e:
        prepare(Cityscapes(), raw, out, workers=1, quiet=True, copy=True)
    assert "--overwrite" in str(e.value)
    other = json.loads((Path(__file__).parents[1] / "hierarchies/cityscapes.json").read_text())
    other["levels"][0]["classes"][0]["raw"] = [7, 9]  # parking counted as road
    other["raw"]["ignore"].remove(9)
    (tmp_path / "h.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="hierarchy differs"):
        prepare(Cityscapes(), raw, out, hierarchy=tmp_path / "h.json", workers=1, quiet=True)
    m = prepare(Cityscapes(), raw, out, workers=1, quiet=True, overwrite=True)
    assert m["_run"]["converted"] == 10
    assert outputs(out) == outputs(ref)


def test_limit_then_full_run_reuses_the_first_files(small, tmp_path):
    raw, ref = small
    out = tmp_path / "out"
    m = prepare(Cityscapes(), raw, out, workers=1, quiet=True, limit=2)
    assert {s: v["images"] for s, v in m["splits"].items()} == {"train": 2, "val": 2}
    m = prepare(Cityscapes(), raw, out, workers=1, quiet=True)
    assert m["_run"]["reused"] == 4 and m["_run"]["converted"] == 6
    assert outputs(out) == outputs(ref)


def test_copy_writes_real_files(small, tmp_path):
    """Every train image (7 frames in RAW) is a regular file with the raw image's bytes."""
    raw, _ = small
    prepare(Cityscapes(), raw, tmp_path / "out", workers=1, quiet=True, copy=True)
    sources = {p.name.replace("_leftImg8bit.png", ".png"): p for p in raw.glob("leftImg8bit/train/*/*_leftImg8bit.png")}
    images = sorted((tmp_path / "out/train/images").iterdir())
    assert len(sources) == 7 and [p.name for p in images] == sorted(sources)
    for p in images:
        assert p.is_file() and not p.is_symlink()
        assert p.read_bytes() == sources[p.name].read_bytes()


def test_never_writes_under_raw_and_never_into_foreign_folders(small, tmp_path):
    raw, _ = small
    before = sorted(str(p) for p in raw.rglob("*"))
    with pytest.raises(UserError, match="inside the raw release"):
        prepare(Cityscapes(), raw, raw / "prepared", workers=1, quiet=True)
    with pytest.raises(UserError, match="inside the raw release"):
        prepare(Cityscapes(), raw, raw, workers=1, quiet=True)
    with pytest.raises(UserError, match="is inside --out"):
        prepare(Cityscapes(), raw, raw.parent, workers=1, quiet=True)
    assert sorted(str(p) for p in raw.rglob("*")) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="holds no hiposeg prepared dataset"):
            prepare(Cityscapes(), raw, foreign, workers=1, quiet=True, overwrite=overwrite)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_manifest_schema(small):
    _, ref = small
    m = json.loads((ref / "manifest.json").read_text())
    for key in ("hiposeg_version", "source", "raw_root", "hierarchy", "options", "splits", "missing_splits", "created"):
        assert key in m
    assert set(m["hierarchy"]) >= {"name", "sha256"}
    for split in m["splits"].values():
        assert set(split) >= {"images", "pixels", "unknown_values", "skipped"}
        assert set(split["pixels"]) == {"fine", "coarse", "ignore"}
        assert len(split["pixels"]["fine"]) == 19 and len(split["pixels"]["coarse"]) == 7
        assert sum(split["pixels"]["fine"].values()) + split["pixels"]["ignore"] == split["images"] * 32 * 64
        assert sum(split["pixels"]["coarse"].values()) == sum(split["pixels"]["fine"].values())


def test_default_workers_follows_the_usable_cpus():
    """All cores this process may run on (its affinity mask, not the machine's core count)."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    cpus = os.sched_getaffinity(0)
    assert pool.default_workers() == len(cpus)
    try:
        os.sched_setaffinity(0, {min(cpus)})  # this thread pinned to one core
        assert pool.default_workers() == 1
    finally:
        os.sched_setaffinity(0, cpus)
