"""A run directory: what it holds, who may write it, and the rules of `--resume` (README
"Checkpoints and resume").

    config.yaml              the resolved configuration (written first: it marks a run directory)
    status.json              {"state": running | interrupted | finished | diverged, "iteration", "run_id", ...}
    checkpoints/last.pt      the latest checkpoint; checkpoints/best.pt: the best fine mIoU so far
    metrics.jsonl            one JSON object per log step or evaluation (tensorboard/ beside it)
    report.json              the final evaluation
    .hiposeg.lock            held by the one process (group) writing the run (`hiposeg.lock`)

A run directory belongs to one run: every run carries a run id (status.json, checkpoints), so
`--resume` never continues one run in another's directory, nor from an older checkpoint than its
last.pt. `train` and `ablate` read a run's state here, and `eval`, `export` and `predict` find a
run's checkpoint here (`resolve_checkpoint`).
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hiposeg import checkpoint
from hiposeg.atomic import TMP_PREFIX, atomic_write_json, check_writable, file_in_the_way, remove_stale_temps
from hiposeg.config import (TrainConfig, build_config, deep_update, load_config_file, merge_layers, parse_set,
                            save_config, validate_config)
from hiposeg.errors import UserError
from hiposeg.lock import LOCK_NAME, DirectoryLock
from hiposeg.safeload import load_json

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
REPORT_FILE = "report.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
WORKER_ERROR_FILE = ".worker-error.json"  # a `--gpus N` worker's UserError, for the launching process
# A run writes config.yaml first, so a folder without one of these is not (yet) a run directory.
RUN_MARKERS = (CONFIG_FILE, STATUS_FILE, CHECKPOINT_DIR)
# What --resume may change: where the data lives, not what it is (run.* may change too, but the seed).
MOVABLE_FIELDS = {"data.root", "data.dataset", "data.workers"}


def checkpoint_path(run: Path, name: str = "last") -> Path:
    return run / CHECKPOINT_DIR / f"{name}.pt"


def resume_command(out: Path, launcher: str = "single") -> str:
    """The command that continues the run in `out` (every message that gives it uses this one)."""
    if launcher == "torchrun":
        return f"`torchrun [your launch options] -m hiposeg train --resume --out {out}`"
    return f"`hiposeg train --resume --out {out}`"


def resolve_checkpoint(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint file, or a run directory (-> its `checkpoints/{prefer}.pt`, else the other one)."""
    if prefer not in ("best", "last"):
        raise UserError(f"--checkpoint {prefer!r} is not best or last")
    p = Path(path)
    if p.is_dir():
        order = [prefer, "last" if prefer == "best" else "best"]
        for name in order:
            cand = checkpoint_path(p, name)
            if cand.exists():
                return cand
        raise UserError(f"no checkpoint in run directory {p} (looked for checkpoints/{order[0]}.pt and {order[1]}.pt)",
                        hint="Train first (`hiposeg train --out DIR`) or pass a checkpoint file.")
    if not p.exists():
        raise UserError(f"no such run directory or checkpoint: {p}")
    return p


# ==========================================================================================
# Status
# ==========================================================================================


def read_json(path: Path) -> Any:
    """A JSON file hiposeg wrote (status, report), or None when it does not exist."""
    if not path.exists():
        return None
    try:
        return load_json(path.read_bytes(), str(path))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def write_status(run: Path, state: str, iteration: int, run_id: str, **more: Any) -> None:
    atomic_write_json(run / STATUS_FILE, {"state": state, "iteration": iteration, "run_id": run_id, **more})


def mark_diverged(run: Path, message: str) -> None:
    """Say in status.json that the loss diverged: `ablate` and schedulers read it."""
    old = read_json(run / STATUS_FILE) or {}
    atomic_write_json(run / STATUS_FILE, {**old, "state": "diverged", "error": message})


def read_status(run: Path) -> dict[str, Any]:
    """status.json as a dict; a missing, unreadable or damaged one reads as no status ({})."""
    try:
        status = load_json((run / STATUS_FILE).read_bytes(), str(run / STATUS_FILE))
    except (OSError, UserError):
        return {}
    return status if isinstance(status, dict) else {}


def run_state(run: Path) -> str:
    """"finished" (status finished + report.json), "diverged" (the engine stopped it on a non-finite
    loss: resuming would repeat that), "resume" (a last.pt to continue), or "new"."""
    state = read_status(run).get("state")
    if state == "finished" and (run / REPORT_FILE).exists():
        return "finished"
    if state == "diverged":
        return "diverged"
    return "resume" if checkpoint_path(run).exists() else "new"


# ==========================================================================================
# One owner, one run
# ==========================================================================================


def check_target(out: Path, what: str = "run directory", kind: str = "a hiposeg run directory",
                 foreign: Callable[[Path], list[str]] | None = None) -> None:
    """Before anything is written: `out` can be a `what` (also `ablate`'s directory): not a file's
    path, not inside a prepared dataset, not a folder of other files (`foreign(out)`: the entries
    that make it one; default `foreign_entries`). Nothing is written there, not even a lock file."""
    from hiposeg.data.dataset import refuse_prepared_dataset

    blocker = file_in_the_way(out)
    if blocker is not None:
        raise UserError(f"{what} {out} cannot be created: {blocker} is a file, not a folder",
                        hint="Choose another --out (a folder, or a new name to create).")
    refuse_prepared_dataset(out, what)
    others = (foreign or foreign_entries)(out)
    if others:
        raise UserError(f"{out} is not {kind}: it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}",
                        hint="Choose a new or empty --out; hiposeg does not write into a folder of other files.")


def claim(out: Path, resume: Path | None) -> tuple[DirectoryLock, str]:
    """Lock the run directory, check it can be written, and decide the run id to write under."""
    lock = DirectoryLock(out, "run directory").acquire()
    try:
        check_writable(out, "run directory")
        run_id = run_id_for(out, resume)
    except BaseException:
        lock.release()
        raise
    return lock, run_id


def start(out: Path, cfg: TrainConfig) -> None:
    """The run directory as a new process (group) takes it over: its config, no stale temp files
    (this process holds the lock: no temp file is live)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out / CHECKPOINT_DIR)
    save_config(cfg, out / CONFIG_FILE)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def run_id_for(out: Path, resume: Path | None) -> str:
    """The run id to write under, after the rules:

    * (a folder holding files that are not a hiposeg run was refused before: `check_target`);
    * without --resume: a folder holding a checkpoint is refused; a run killed before its first
      checkpoint is started over (new id);
    * with --resume X: a new or empty folder continues X's run there; a folder holding a run
      continues it only if it is X's own run, and never from an older checkpoint than its last.pt."""
    last = checkpoint_path(out)
    if resume is None:
        if last.exists():
            raise UserError(f"run directory {out} already holds a checkpoint (checkpoints/last.pt)",
                            hint=f"Resume it with {resume_command(out)}, or choose a new --out.")
        return new_run_id()
    mine = checkpoint.summary(resume)
    if not any((out / m).exists() for m in RUN_MARKERS):
        return mine["run_id"] or new_run_id()  # continue the run in a new place
    same_file = last.exists() and Path(resume).resolve() == last.resolve()
    theirs = run_id_of(out)
    if theirs is not None and mine["run_id"] is not None:
        same_run = theirs == mine["run_id"]
    else:  # a run from before run ids: its checkpoint must come from this directory
        same_run = Path(resume).resolve().parent == (out / CHECKPOINT_DIR).resolve()
    if not (same_file or same_run):
        raise UserError(f"{out} holds another run (run id {theirs or 'unrecorded'}) than the checkpoint {resume} "
                        f"(run id {mine['run_id'] or 'unrecorded'}): resuming would replace its checkpoints and "
                        "mix its logs",
                        hint="Resume into the checkpoint's own run directory, or into a new --out.")
    if not same_file and last.exists():
        at = checkpoint.summary(last)["iteration"]
        if at is not None and mine["iteration"] is not None and at > mine["iteration"]:
            raise UserError(f"resuming {resume} (iteration {mine['iteration']}) into {out} would replace its "
                            f"checkpoints/last.pt (iteration {at})",
                            hint=f"Resume from {last}, or continue from {resume} in a new --out.")
    return mine["run_id"] or theirs or new_run_id()


def run_id_of(out: Path) -> str | None:
    """The id of the run in `out`: from status.json, else from its last checkpoint (older runs: None)."""
    status = read_json(out / STATUS_FILE)
    if isinstance(status, dict) and status.get("run_id"):
        return str(status["run_id"])
    last = checkpoint_path(out)
    return checkpoint.summary(last)["run_id"] if last.exists() else None


def foreign_entries(out: Path) -> list[str]:
    """What makes `out` a folder of other files: its entries, unless it is a run directory (it holds a
    run's marker files, whatever else the user put there) or holds only a lock or temp files."""
    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir())
    if any(m in names for m in RUN_MARKERS):
        return []
    return [n for n in names if n not in (LOCK_NAME, WORKER_ERROR_FILE) and not n.startswith(TMP_PREFIX)]


def write_error(e: OSError, out: Path) -> UserError | None:
    """A failed write into the run directory (full, read-only, forbidden) as one clear error naming
    the way on; None for anything else (a bug or a read error: keep the traceback)."""
    if not is_write_failure(e, out):
        return None
    what = e.filename or f"to {out}"
    lead = (f"no space left on the device while writing {what}" if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else f"cannot write {what}: {e.strerror or e}")
    return UserError(lead, hint="The last checkpoint written is intact. Free disk space or make the folder writable "
                                f"(or choose another --out), then resume with {resume_command(out)}.")


def is_write_failure(e: OSError, out: Path) -> bool:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    if e.filename is None:
        return False
    path = os.path.abspath(e.filename)
    return path == os.path.abspath(out) or path.startswith(os.path.abspath(out) + os.sep)


# ==========================================================================================
# The resume policy: which checkpoint, and what may change
# ==========================================================================================


def resolve_train_config(config_file: Path | None, flags: dict[str, Any], sets: list[str],
                         resume: str | None) -> tuple[TrainConfig, Path | None]:
    """The run's config from `--config`, the flags and `--set`, and the checkpoint `--resume` names
    (None: a new run). On --resume the checkpoint's config is the base: only run.* fields (devices,
    precision, logging, checkpoint cadence; not the seed, which fixes the data stream) and where the
    data lives may change, so a resumed run is the same experiment; the engine then checks the data's
    hierarchy against the checkpoint's."""
    layers = [load_config_file(config_file) if config_file else {}, flags, parse_set(sets)]
    if resume is None:
        source = f"training configuration (--config {config_file} and flags)" if config_file else "training configuration"
        return build_config(*layers, source=source), None
    explicit = merge_layers(*layers, source="training configuration")
    path = checkpoint_to_resume(resume, explicit.get("run", {}).get("out"))
    if resume != "last" and path.parent.name == CHECKPOINT_DIR and not explicit.get("run", {}).get("out"):
        explicit.setdefault("run", {})["out"] = str(path.parent.parent)  # continue in that run directory
    return resumed_config(path, explicit), path


def checkpoint_to_resume(resume: str, out: str | None) -> Path:
    """Bare --resume ("last"): --out's checkpoints/last.pt; else a checkpoint file or run directory."""
    if resume != "last":
        return resolve_checkpoint(resume, prefer="last")
    if not out or Path(out) == Path("."):
        raise UserError("--resume without a checkpoint path needs --out RUN (the run directory to continue)",
                        hint="Example: hiposeg train --resume --out runs/synthetic-resnet18")
    path = checkpoint_path(Path(out))
    if not path.exists():
        raise UserError(f"nothing to resume: {path} does not exist",
                        hint=f"Start the run without --resume, or check --out (given: {out}).")
    return path


def resumed_config(path: Path, explicit: dict[str, Any]) -> TrainConfig:
    """The checkpoint's config with the `explicit` overrides, refused if they change the experiment."""
    saved = validate_config(checkpoint.load(path)["config"], source=f"configuration saved in {path}")
    resumed = validate_config(deep_update(saved.to_plain(), explicit), source=f"configuration resumed from {path}")
    changed = [f"{sec}.{k}" for sec in ("data", "model", "loss", "optim")
               for k, v in getattr(resumed, sec).model_dump(mode="json").items()
               if getattr(saved, sec).model_dump(mode="json")[k] != v and f"{sec}.{k}" not in MOVABLE_FIELDS]
    if resumed.run.seed != saved.run.seed:  # the data order and augmentations are a function of it
        changed.append("run.seed")
    if changed:
        raise UserError(f"--resume continues the same experiment, but these settings differ from the checkpoint "
                        f"{path}: {', '.join(changed)}",
                        hint="Drop those flags to resume, or start a new run with a new --out.")
    return resumed
