"""A run directory: what it holds, who may write it, and the rules of `--resume` (README
"Checkpoints and resume").

    status.json              {"state": running | interrupted | finished | diverged, "iteration", "run_id", ...}
                             (written first, when the run starts: it marks a run directory)
    config.yaml              the resolved configuration
    checkpoints/last.pt      the latest checkpoint; checkpoints/best.pt: the best fine mIoU so far
    metrics.jsonl            one JSON object per log step or evaluation (tensorboard/ beside it)
    report.json              the final evaluation
    .hiposeg.lock            held by the one process (group) writing the run (`hiposeg.lock`)

A run directory belongs to one run: every run carries a run id (status.json, checkpoints), so
`--resume` never continues one run in another's directory, nor from an older checkpoint than its
last.pt. A folder is taken for a run directory only if it provably holds one (`is_run_directory`: a
hiposeg status.json with a run id, or a hiposeg checkpoint), never for a file name it holds; hiposeg
writes nothing there through a link (`claim`). `train` and `ablate` read a run's state here, and
`eval`, `export` and `predict` find a run's checkpoint here (`resolve_checkpoint`).
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hiposeg import checkpoint
from hiposeg.atomic import (OWN_TEMP, atomic_write_json, check_writable, file_in_the_way, refuse_links,
                            remove_stale_temps)
from hiposeg.config import (TrainConfig, build_config, deep_update, load_config_file, merge_layers, parse_set,
                            save_config, validate_config)
from hiposeg.data.codecs import BadFile, read_regular_bytes
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
RUN_STATES = ("running", "interrupted", "finished", "diverged")
RUN_ID = re.compile(r"[0-9a-f]{16}")  # new_run_id
# What a run writes in place (not by temp file + rename): never a link, so it cannot write elsewhere.
WRITTEN_IN_PLACE = (CHECKPOINT_DIR, TENSORBOARD_DIR, METRICS_FILE)
MAX_JSON_BYTES = 64 << 20  # status.json, report.json, ablation.json: hiposeg writes them far smaller
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
    """A JSON file hiposeg wrote (status, report, ablation.json), or None when it does not exist. Read
    only if it is a regular file of a plausible size: a named pipe there would block the run forever."""
    if not path.exists():
        return None
    try:
        if os.stat(path).st_size > MAX_JSON_BYTES:
            raise UserError(f"{path} is {os.stat(path).st_size:,} bytes, not a file hiposeg wrote",
                            hint=f"Move {path} away, or choose another folder.")
        return load_json(read_regular_bytes(path), str(path))
    except BadFile as e:
        raise UserError(f"cannot read {e}", hint=f"Remove {path}, or choose another folder.") from None
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
        status = read_json(run / STATUS_FILE)
    except UserError:
        return {}
    return status if isinstance(status, dict) else {}


def is_run_directory(out: Path) -> bool:
    """Whether `out` provably holds a hiposeg run: a status.json of hiposeg's form (a known state, an
    iteration, a run id), or a hiposeg training checkpoint (runs from before run ids). File names
    alone (a project's config.yaml, a checkpoints/ folder of other weights) prove nothing."""
    status = read_status(out)
    if (status.get("state") in RUN_STATES and type(status.get("iteration")) is int
            and RUN_ID.fullmatch(str(status.get("run_id")))):
        return True
    return any(checkpoint.is_checkpoint(checkpoint_path(out, name)) for name in ("last", "best"))


def enclosing_run(path: Path) -> Path | None:
    """The run directory `path` lies in (after resolving links), if any."""
    for d in Path(path).resolve().parents:
        if is_run_directory(d):
            return d
    return None


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
                 proven: Callable[[Path], bool] | None = None) -> None:
    """Before anything is written: `out` can be a `what` (also `ablate`'s directory): not a file's
    path, not inside a prepared dataset, and new, empty (but for hiposeg's lock and temp files) or
    provably one (`proven(out)`; default `is_run_directory`), never a folder of other files (a failed
    `--gpus N` launch leaves only its lock and `.worker-error.json`: still empty). Nothing
    is written there, not even a lock file."""
    from hiposeg.data.dataset import refuse_prepared_dataset

    blocker = file_in_the_way(out)
    if blocker is not None:
        raise UserError(f"{what} {out} cannot be created: {blocker} is a file, not a folder",
                        hint="Choose another --out (a folder, or a new name to create).")
    refuse_prepared_dataset(out, what)
    if not out.is_dir() or (proven or is_run_directory)(out):
        return
    others = [n for n in sorted(os.listdir(out)) if n not in (LOCK_NAME, WORKER_ERROR_FILE) and not OWN_TEMP.match(n)]
    if others:
        raise UserError(f"{out} is not {kind}: it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}",
                        hint="Choose a new or empty --out; hiposeg does not write into a folder of other files.")


def claim(out: Path, resume: Path | None) -> tuple[DirectoryLock, str]:
    """Lock the run directory, check it can be written (and that nothing the run writes in place is a
    link), and decide the run id to write under."""
    lock = DirectoryLock(out, "run directory").acquire()
    try:
        refuse_links(out, WRITTEN_IN_PLACE, "run directory")
        check_writable(out, "run directory")
        run_id = run_id_for(out, resume)
    except BaseException:
        lock.release()
        raise
    return lock, run_id


def start(out: Path, cfg: TrainConfig, iteration: int, run_id: str) -> None:
    """The run directory as a new process (group) takes it over: status.json first (it marks the
    folder as a run directory), no stale temp files (the lock is held for it: no temp file is live),
    its config."""
    write_status(out, "running", iteration, run_id)
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
    if not is_run_directory(out):  # new or empty (`check_target` refused a folder of other files)
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
    out = explicit.get("run", {}).get("out")
    path = checkpoint_to_resume(resume, out)
    if resume != "last" and path.parent.name == CHECKPOINT_DIR and not out:
        explicit.setdefault("run", {})["out"] = str(path.parent.parent)  # continue in that run directory
    cfg = resumed_config(path, explicit)
    if not explicit.get("run", {}).get("out"):
        raise UserError(f"--resume {path}: the checkpoint is not in a run directory's {CHECKPOINT_DIR}/ folder, so "
                        f"which run directory to continue in is not known (the checkpoint records {cfg.run.out})",
                        hint=f"Add --out DIR: a new folder continues the run there; --out {cfg.run.out} continues "
                             "it in the directory it was trained in.")
    return cfg, path


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
