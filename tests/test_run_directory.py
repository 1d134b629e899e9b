"""The run directory (`hiposeg.rundir`): runs that would overwrite each other.

A run directory belongs to one process (group) and one run at a time: a second `train` into a live
run is refused naming the holder and changes nothing; a killed run's lock is free; `--resume` never
continues one run in another run's directory (nor from an older checkpoint than its last.pt); the
data and run paths are recorded absolute, so a run resumes from any working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import fails_with, squash
from faults import (StopAfter, kill, load_checkpoint, logged_iterations, one_thread, start, tail,  # noqa: F401
                    temp_files, train_args, wait_for)
from faults import run as run_cli
from hiposeg.cli import app
from hiposeg.lock import LOCK_NAME, DirectoryLock

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, temp files included (not TensorBoard's, written by a background
    thread, nor the lock's holder record, which each process that takes the lock rewrites)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "tensorboard" not in p.parts and p.name != LOCK_NAME}


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def test_a_second_train_into_a_live_run_is_refused_naming_the_holder_and_a_killed_runs_lock_is_free(cli, tiny_data,
                                                                                                    tmp_path):
    out = tmp_path / "run"
    ready, log = tmp_path / "ready", tmp_path / "first.log"
    # the first run hangs in the middle of writing its first checkpoint: a temp file is in flight
    first = start(train_args(tiny_data, out, iters=4, ckpt_every=2), log,
                  inject=["stall-write", "last.pt", "1", "4096", str(ready)])
    try:
        wait_for(ready.exists, first, log, "the first run's checkpoint write")
        before = snapshot(out)
        assert temp_files(out / "checkpoints") and logged_iterations(out) == [1, 2]
        fails_with(train_args(tiny_data, out, iters=4, ckpt_every=2),
                   f"run directory {out} is in use by another hiposeg process (pid {first.pid} on")
        assert snapshot(out) == before  # config, metrics, status and the in-flight temp file untouched
        assert first.poll() is None, tail(log)
    finally:
        kill(first)
    # SIGKILLed: the kernel released its lock. Killed before its first checkpoint, the run starts over
    # under a new id, its stale temp file cleaned by the new owner and its log begun afresh.
    old_id = status(out)["run_id"]
    r = cli.invoke(app, train_args(tiny_data, out, iters=2, ckpt_every=2))
    assert r.exit_code == 0, r.output
    assert not temp_files(out / "checkpoints")
    assert logged_iterations(out) == [1, 2]
    assert status(out)["state"] == "finished" and status(out)["run_id"] != old_id
    assert load_checkpoint(out / "checkpoints" / "last.pt")["run_id"] == status(out)["run_id"]


def test_resume_into_the_directory_of_another_run_is_refused_and_a_new_folder_continues_the_run(cli, tiny_data,
                                                                                                tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for run in (a, b):
        assert cli.invoke(app, train_args(tiny_data, run, iters=2, ckpt_every=2)).exit_code == 0
    a_id, b_id = status(a)["run_id"], status(b)["run_id"]
    assert a_id != b_id
    before = snapshot(b)
    fails_with(["train", "--resume", a / "checkpoints" / "last.pt", "--out", b, "--quiet"],
               f"{b} holds another run (run id {b_id}) than the checkpoint {a / 'checkpoints' / 'last.pt'} "
               f"(run id {a_id})", "a new --out")
    assert snapshot(b) == before
    # a new folder: the run continues there, under its own id
    r = cli.invoke(app, ["train", "--resume", str(a / "checkpoints" / "last.pt"), "--out", str(c), "--quiet"])
    assert r.exit_code == 0, r.output
    assert status(c)["run_id"] == a_id and (c / "report.json").exists()


def test_resume_from_an_older_checkpoint_never_replaces_a_later_last_checkpoint(cli, tiny_data, tmp_path, monkeypatch):
    import hiposeg.engine as engine

    run, old = tmp_path / "run", tmp_path / "iteration-2.pt"
    monkeypatch.setattr(engine, "StopSignal", lambda: StopAfter(2))
    r = cli.invoke(app, train_args(tiny_data, run, iters=4, ckpt_every=4))
    assert r.exit_code == 130, r.output
    monkeypatch.undo()
    shutil.copy(run / "checkpoints" / "last.pt", old)
    assert cli.invoke(app, ["train", "--resume", "last", "--out", str(run), "--quiet"]).exit_code == 0
    last = run / "checkpoints" / "last.pt"
    before = snapshot(run)
    fails_with(["train", "--resume", old, "--out", run, "--quiet"],
               f"resuming {old} (iteration 2) into {run} would replace its checkpoints/last.pt (iteration 4)")
    assert snapshot(run) == before and load_checkpoint(last)["iteration"] == 4


def test_train_out_that_is_a_file_a_folder_of_other_files_or_inside_a_dataset_is_refused(tiny_data, tmp_path):
    (tmp_path / "file").write_text("mine")
    fails_with(train_args(tiny_data, tmp_path / "file", iters=2),
               f"run directory {tmp_path / 'file'} cannot be created: {tmp_path / 'file'} is a file, not a folder")
    fails_with(train_args(tiny_data, tmp_path / "file" / "run", iters=2),
               f"{tmp_path / 'file'} is a file, not a folder")
    notes = tmp_path / "project"
    notes.mkdir()
    (notes / "config.yml").write_text("mine")
    (notes / "metrics.jsonl").write_text("mine\n")
    fails_with(train_args(tiny_data, notes, iters=2),
               f"{notes} is not a hiposeg run directory: it holds config.yml, metrics.jsonl")
    assert sorted(p.name for p in notes.iterdir()) == ["config.yml", "metrics.jsonl"]
    assert (notes / "metrics.jsonl").read_text() == "mine\n"
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    fails_with(train_args(data, data / "run", iters=2),
               f"run directory {data / 'run'} is inside the prepared dataset {data}")
    assert not (data / "run").exists()


def test_ablate_locks_its_directory_and_refuses_a_folder_of_other_files_a_file_or_a_dataset(tiny_data, tmp_path):
    args = ["ablate", "--losses", "ce", "--data", str(tiny_data), "--iters", "1", "--batch-size", "2",
            "--crop", "64x64", "--backbone", "resnet18", "--workers", "0", "--device", "cpu", "--quiet"]
    out = tmp_path / "abl"
    with DirectoryLock(out, "ablation directory"):  # another `hiposeg ablate` (here: this process) holds it
        fails_with([*args, "--out", out], f"ablation directory {out} is in use by another hiposeg process "
                                          f"(pid {os.getpid()}")
    assert not (out / "ablation.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.txt").write_text("mine")
    fails_with([*args, "--out", other], f"{other} is not an ablation directory: it holds results.txt")
    assert sorted(p.name for p in other.iterdir()) == ["results.txt"]
    fails_with([*args, "--out", other / "results.txt"], f"{other / 'results.txt'} is a file, not a folder")
    fails_with([*args, "--out", tiny_data / "ablations"],
               f"ablation directory {tiny_data / 'ablations'} is inside the prepared dataset {tiny_data}")
    assert not (tiny_data / "ablations").exists()


def test_resume_and_eval_from_another_working_directory_find_the_data_or_ask_for_data(cli, tiny_data,
                                                                                      tmp_path, monkeypatch):
    import hiposeg.engine as engine

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    shutil.copytree(tiny_data, home / "data")
    monkeypatch.chdir(home)
    monkeypatch.setattr(engine, "StopSignal", lambda: StopAfter(1))
    r = cli.invoke(app, train_args(Path("data"), Path("runs/r"), iters=2, ckpt_every=2))  # relative paths
    assert r.exit_code == 130, r.output
    monkeypatch.undo()
    ckpt = home / "runs" / "r" / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["config"]["data"]["root"] == str(home / "data")
    monkeypatch.chdir(elsewhere)
    (home / "data").rename(home / "moved")  # the data moved: the message asks for --data first
    fails_with(["train", "--resume", ckpt, "--quiet"],
               f"no prepared dataset at {home / 'data'}, the data of the run resumed from {ckpt}",
               "Pass --data DIR with the folder the prepared dataset is in now")
    assert not (elsewhere / "data").exists()  # the built-in set was not generated in its place
    fails_with(["eval", ckpt, "--device", "cpu", "--workers", "0"],
               f"no prepared dataset at {home / 'data'}, the data recorded in {ckpt}", "Pass --data DIR")
    (home / "moved").rename(home / "data")
    r = cli.invoke(app, ["train", "--resume", str(ckpt), "--quiet"])  # from elsewhere, into its own run
    assert r.exit_code == 0, r.output
    assert status(home / "runs" / "r")["state"] == "finished" and not (elsewhere / "runs").exists()


def test_an_exported_model_evaluated_from_another_directory_finds_its_data_or_asks_for_data_first(
        cli, tiny_data, tmp_path, monkeypatch):
    """The README's first hour: a run started with relative paths, exported, then evaluated elsewhere."""
    import torch

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(tiny_data, home / "data" / "synthetic")
    monkeypatch.chdir(home)
    assert cli.invoke(app, train_args(Path("data/synthetic"), Path("runs/r"), iters=2)).exit_code == 0
    model = home / "model.pt"
    assert cli.invoke(app, ["export", "runs/r", "--out", str(model)]).exit_code == 0
    monkeypatch.chdir(elsewhere)
    evaluate = ["eval", model, "--device", "cpu", "--workers", "0", "--report", elsewhere / "r.json"]
    r = cli.invoke(app, [str(a) for a in evaluate])
    assert r.exit_code == 0, r.output  # the recorded path is absolute
    (home / "data" / "synthetic").rename(home / "moved")
    said = fails_with(evaluate, f"no prepared dataset at {home / 'data' / 'synthetic'}, the data recorded in {model}",
                      "Pass --data DIR with the folder the prepared dataset is in now; or prepare it again there: "
                      f"`hiposeg prepare synthetic --out {home / 'data' / 'synthetic'}`")
    assert "run `hiposeg prepare" not in said  # --data first, not "run hiposeg prepare"
    r = cli.invoke(app, [str(a) for a in evaluate] + ["--data", str(home / "moved")])
    assert r.exit_code == 0, r.output
    # a model exported before paths were recorded absolute names the folder it would have been relative to
    old = torch.load(model, weights_only=True)
    torch.save({**old, "data": "data/synthetic"}, home / "old.pt")
    fails_with(["eval", home / "old.pt", "--device", "cpu", "--workers", "0"],
               f"no prepared dataset at {elsewhere / 'data' / 'synthetic'} (recorded relative to the folder the run was started in)",
               "Pass --data DIR")


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.mark.slow
def test_workers_of_a_multi_process_run_die_with_the_launcher_that_holds_the_lock(tiny_data, tmp_path):
    """SIGKILL to the launching process only: its `--gpus 2` workers must not go on writing into a run
    directory nobody holds any more. (torch's own spawn asks for SIGINT on the parent's death, which
    the workers took as Ctrl-C: they finished the step and wrote an "interrupted" checkpoint, unlocked.)"""
    out, log = tmp_path / "ddp", tmp_path / "ddp.log"
    proc = start(train_args(tiny_data, out, "--gpus", "2", "--batch-size", "4", iters=200, ckpt_every=100), log)
    try:
        wait_for(lambda: logged_iterations(out), proc, log, "the first logged iteration")
        workers = [p for p in children_of(proc.pid) if "spawn" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        assert len(workers) == 2, (workers, tail(log))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), "a worker outlived the launcher"
    finally:
        kill(proc)
    assert not (out / "checkpoints" / "last.pt").exists() and status(out)["state"] == "running"
    with DirectoryLock(out, "run directory") as lock:
        assert lock.held


# ------------------------------------------------------------------------------------------
# A run directory is one provably: file names prove nothing, and nothing is written through a link
# ------------------------------------------------------------------------------------------


def hiposeg_status(run: Path, state: str = "running") -> None:
    """The status.json `hiposeg train` writes when it claims a folder (a run killed before its first checkpoint)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "status.json").write_text(json.dumps({"state": state, "iteration": 0, "run_id": "0123456789abcdef"}))


def test_a_folder_holding_a_projects_config_status_or_checkpoints_is_not_a_run_directory(tiny_data, tmp_path):
    """The names a run writes (config.yaml, status.json, checkpoints/, report.json) are common in other
    projects: a folder holding them is refused unless its status.json or checkpoint is hiposeg's, and
    nothing in it changes."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.yaml").write_text("db: postgres://prod\n")
    (project / "report.json").write_text('{"my": "report"}\n')
    weights = tmp_path / "weights"
    (weights / "checkpoints").mkdir(parents=True)
    torch_file = weights / "checkpoints" / "best.pt"
    import torch

    torch.save({"state_dict": {"w": torch.zeros(2)}}, torch_file)
    tool = tmp_path / "tool"
    tool.mkdir()
    (tool / "status.json").write_text('{"state": "running", "iteration": 3, "run_id": "job-17"}\n')
    for folder, entries in [(project, "config.yaml, report.json, src"), (weights, "checkpoints"),
                            (tool, "status.json")]:
        before = snapshot(folder)
        fails_with(train_args(tiny_data, folder, iters=2),
                   f"{folder} is not a hiposeg run directory: it holds {entries}")
        assert snapshot(folder) == before and not (folder / LOCK_NAME).exists()


def test_a_folder_left_by_a_failed_multi_process_launch_is_still_empty(tmp_path):
    """A `--gpus N` launch whose worker failed before the run started leaves only its lock and
    .worker-error.json (hiposeg's own files): the next `train --out` there is accepted; a user's file
    beside them is not."""
    from hiposeg.errors import UserError
    from hiposeg.rundir import WORKER_ERROR_FILE, check_target

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("")
    (out / WORKER_ERROR_FILE).write_text('{"message": "no data", "hint": null}')
    check_target(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a hiposeg run directory: it holds notes.txt"):
        check_target(out)


def test_ablate_out_holding_results_tables_or_a_runs_folder_is_not_an_ablation_directory(tiny_data, tmp_path):
    """results.csv and runs/ (TensorBoard's default log folder) prove nothing; a foreign ablation.json
    neither. Only an ablation.json of hiposeg's format makes a folder an ablation directory."""
    args = ["ablate", "--losses", "ce", "--data", str(tiny_data), "--iters", "1", "--batch-size", "2",
            "--crop", "64x64", "--backbone", "resnet18", "--workers", "0", "--device", "cpu", "--quiet"]
    tables, logs, other = tmp_path / "tables", tmp_path / "logs", tmp_path / "other"
    tables.mkdir()
    (tables / "results.csv").write_text("model,acc\nmine,0.99\n")
    (logs / "runs" / "exp1").mkdir(parents=True)
    other.mkdir()
    (other / "ablation.json").write_text('{"experiments": []}\n')
    for folder, entries in [(tables, "results.csv"), (logs, "runs"), (other, "ablation.json")]:
        before = snapshot(folder)
        fails_with([*args, "--out", folder], f"{folder} is not an ablation directory: it holds {entries}")
        assert snapshot(folder) == before and not (folder / LOCK_NAME).exists()


@pytest.mark.parametrize("entry", ["metrics.jsonl", "metrics.jsonl (hard link)", "checkpoints", "tensorboard"])
def test_nothing_in_a_run_directory_is_written_through_a_link(tiny_data, tmp_path, entry):
    """A run writes metrics.jsonl, checkpoints/ and tensorboard/ in place: a symbolic link there (to a
    user's file or folder) or a hard-linked metrics.jsonl is refused before anything is written, and
    the linked file or folder is unchanged."""
    run, mine = tmp_path / "run", tmp_path / "mine"
    hiposeg_status(run)
    name = entry.split()[0]
    if name == "metrics.jsonl":
        mine.write_text("my notes\n")
        (os.link if "hard" in entry else os.symlink)(mine, run / name)
    else:
        mine.mkdir()
        (mine / "best.pt").write_text("my weights\n")
        (run / name).symlink_to(mine, target_is_directory=True)
    before = snapshot(mine) if mine.is_dir() else mine.read_text()
    kind = "a hard link to another file" if "hard" in entry else "a symbolic link"
    fails_with(train_args(tiny_data, run, iters=2), f"{run / name} is {kind}", "hiposeg never writes through a link")
    assert (snapshot(mine) if mine.is_dir() else mine.read_text()) == before
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK_NAME, "status.json", name])


def test_the_metrics_log_is_never_opened_through_a_link(tmp_path):
    """The opener itself (a link made after the start-of-run check): O_NOFOLLOW for a symbolic link, the
    link count for a hard link, checked before anything is truncated."""
    from hiposeg.atomic import open_log
    from hiposeg.errors import UserError

    mine = tmp_path / "mine.txt"
    mine.write_text("my notes\n")
    (tmp_path / "sym.jsonl").symlink_to(mine)
    os.link(mine, tmp_path / "hard.jsonl")
    for name, kind in [("sym.jsonl", "a symbolic link"), ("hard.jsonl", "a hard link to another file")]:
        for append in (False, True):
            with pytest.raises(UserError, match=f"is {kind}: hiposeg never writes through a link"):
                open_log(tmp_path / name, append=append)
    assert mine.read_text() == "my notes\n"
    with open_log(tmp_path / "new.jsonl", append=False) as f:
        f.write("{}\n")
    assert (tmp_path / "new.jsonl").read_text() == "{}\n"


def test_stale_temp_files_removed_are_hiposegs_own_only(cli, tiny_data, tmp_path):
    """A new owner deletes the temp files a killed run left in checkpoints/ (`.tmp-last.pt.` + mkstemp's
    8 characters), never a user's file that merely starts with `.tmp-`."""
    run = tmp_path / "run"
    hiposeg_status(run)
    ckpts = run / "checkpoints"
    ckpts.mkdir()
    users = {".tmp-notes": "mine", ".tmp-last.pt.draft-v2": "mine too"}
    for name, text in users.items():
        (ckpts / name).write_text(text)
    (ckpts / ".tmp-last.pt.k3j9x0qa").write_bytes(b"torn checkpoint")
    assert cli.invoke(app, train_args(tiny_data, run, iters=2)).exit_code == 0
    assert {p.name: p.read_text() for p in ckpts.iterdir() if p.name.startswith(".tmp-")} == users


def fifo_in_place(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def test_a_named_pipe_in_a_run_directory_is_named_and_never_waited_on(cli, tiny_run, tmp_path):
    """status.json, report.json or a checkpoint replaced by a FIFO (which a plain read would wait on
    forever): `train --resume`, `ablate` (rerun over its runs), `eval --report` and `eval` of the run
    say what the file is."""
    data, trained = tiny_run
    run, abl = tmp_path / "run", tmp_path / "abl"
    shutil.copytree(trained, run)
    log = tmp_path / "log"
    status = fifo_in_place(run / "status.json")
    cases = [(["train", "--resume", trained / "checkpoints" / "last.pt", "--out", run, "--quiet"], status)]
    ablate = ["ablate", "--losses", "ce", "--data", data, "--out", abl, "--iters", "1", "--batch-size", "2",
              "--crop", "64x64", "--backbone", "resnet18", "--workers", "0", "--device", "cpu", "--quiet"]
    assert cli.invoke(app, [str(a) for a in ablate]).exit_code == 0
    cases.append((ablate, fifo_in_place(abl / "runs" / "losses=ce" / "seed-0" / "status.json")))
    report = fifo_in_place(tmp_path / "report.json")
    cases.append((["eval", run / "checkpoints" / "last.pt", "--report", report, "--device", "cpu", "--workers", "0"],
                  f"--report {report} exists and is not a hiposeg report"))
    best = fifo_in_place(run / "checkpoints" / "best.pt")
    cases.append((["eval", run, "--checkpoint", "best", "--device", "cpu", "--workers", "0"], best))
    for args, needle in cases:
        log.write_text("")
        assert run_cli(args, log, timeout=60) == 2, tail(log)
        output = squash(tail(log))
        assert "Traceback" not in output and squash(str(needle)) in output, tail(log)
        assert isinstance(needle, str) or squash("is a named pipe (FIFO), not a regular file") in output, tail(log)


def test_resuming_a_checkpoint_outside_a_run_directory_asks_for_out(cli, tiny_run, tmp_path):
    """A checkpoint copied out of its run (e.g. downloaded) records the absolute run directory it was
    trained in, on another machine perhaps: `--resume FILE` names it and asks for --out instead of
    creating that folder; with --out the run continues there."""
    _, trained = tiny_run
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    ckpt = Path(shutil.copy(trained / "checkpoints" / "last.pt", downloads / "last.pt"))
    before = snapshot(trained)
    fails_with(["train", "--resume", ckpt, "--quiet", "--device", "cpu"],
               f"--resume {ckpt}: the checkpoint is not in a run directory's checkpoints/ folder",
               f"(the checkpoint records {trained})", "Add --out DIR", f"--out {trained} continues")
    assert snapshot(trained) == before and sorted(p.name for p in downloads.iterdir()) == ["last.pt"]
    r = cli.invoke(app, ["train", "--resume", str(ckpt), "--out", str(tmp_path / "continued"), "--quiet",
                         "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert status(tmp_path / "continued")["run_id"] == load_checkpoint(ckpt)["run_id"]
