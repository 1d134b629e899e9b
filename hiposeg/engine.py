"""The one training engine: `fit(config)` serves `hiposeg train` and every `hiposeg ablate` run,
and `evaluate(...)` serves `hiposeg eval`, periodic evaluation and the end of training.

Read top to bottom:
    fit                 launch N processes if asked, else run `train_worker` here
    train_worker        data, model + HiPoSeg branch, optimiser, resume, the loop
    the loop            poly lr -> forward (AMP) -> eq. 14 -> finite check -> backward -> step
                        -> log -> checkpoint / evaluate; SIGINT/SIGTERM save and stop cleanly
    evaluate            confusion matrix over the whole split at full label resolution

The run directory belongs to one run and one process (group) at a time: the launching process
(for `--gpus N` the parent of the workers, under torchrun global rank 0) holds its lock
(`hiposeg.lock.DirectoryLock`) from before the first write to the end, and every run carries a run
id (status.json, checkpoints) so `--resume` never continues one run in another's directory
(`open_run`, `check_run_dir`).

Exact resume: data order and augmentation are pure functions of (seed, global sample position)
(`IterationSampler`), the lr is a function of the iteration, and checkpoints carry the model,
prototype memory, optimiser, scaler and RNG states, so an interrupted run resumed with `--resume`
ends with the same weights as an uninterrupted one (bit-exact in `--deterministic` mode).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from hiposeg import __version__, checkpoint
from hiposeg.config import TrainConfig, save_config
from hiposeg.distributed import (DistEnv, any_rank, broadcast_buffers_, broadcast_object, check_world, init_from_env,
                                 launched_by_torchrun, shutdown, spawn)
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.inference import predict_logits
from hiposeg.atomic import TMP_PREFIX, atomic_write_json, check_writable, file_in_the_way, remove_stale_temps
from hiposeg.lock import LOCK_NAME, DirectoryLock
from hiposeg.metrics import ConfusionMatrix, build_report, summary_line
from hiposeg.safeload import load_json

STATUS_FILE = "status.json"
WORKER_ERROR_FILE = ".worker-error.json"
# A run writes config.yaml first, so a folder without one of these is not (yet) a run directory.
RUN_MARKERS = ("config.yaml", STATUS_FILE, "checkpoints")


@dataclass
class FitResult:
    out: Path
    report: dict[str, Any] | None
    iterations: int
    interrupted: bool
    is_main: bool = True  # False on the other ranks under torchrun: they neither write nor print


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the run stops and the last good checkpoint is kept."""


# ==========================================================================================
# Entry point
# ==========================================================================================


def fit(cfg: TrainConfig, *, resume: Path | None = None) -> FitResult:
    """Train (and finally evaluate) per `cfg`; `resume` is a checkpoint file to continue from."""
    cfg = with_absolute_paths(cfg)
    if launched_by_torchrun():
        check_world(int(os.environ["WORLD_SIZE"]), cfg.run.device)
        return _fit_under_torchrun(cfg, resume)
    lock, run_id = open_run(cfg, resume)
    try:
        world = cfg.run.gpus
        if world > 1:
            check_world(world, cfg.run.device)
            return _fit_spawned(cfg, resume, run_id, world)
        return train_worker(cfg, resume, run_id)
    finally:
        lock.release()


def _fit_spawned(cfg: TrainConfig, resume: Path | None, run_id: str, world: int) -> FitResult:
    """`--gpus N`: this process holds the run directory; the N workers it starts write into it."""
    out = cfg.resolved_out()
    err_file = out / WORKER_ERROR_FILE
    err_file.unlink(missing_ok=True)
    try:
        spawn(world, _spawned_worker, (cfg, resume, run_id))  # forwards SIGINT/SIGTERM to the workers
    except Exception as e:  # a worker failed: surface its UserError if it left one
        if err_file.exists():
            info = load_json(err_file.read_bytes(), str(err_file))
            raise UserError(info["message"], hint=info.get("hint")) from None
        raise RuntimeError(f"a training process failed: {e}") from e
    return _result_from_files(out)


def _fit_under_torchrun(cfg: TrainConfig, resume: Path | None) -> FitResult:
    """Every rank joins the group; global rank 0 opens the run (data, lock, run-directory rules) and
    tells the others the outcome, so a refusal ends every rank at once instead of leaving them waiting."""
    env = init_from_env(cfg.run.device)
    lock: DirectoryLock | None = None
    outcome: tuple[str, str, str | None] = ("ok", "", None)
    if env.is_main:
        try:
            lock, run_id = open_run(cfg, resume)
            outcome = ("ok", run_id, None)
        except UserError as e:
            outcome = ("error", e.message, e.hint)
        except BaseException as e:
            broadcast_object(("bug", f"rank 0 failed to start the run: {type(e).__name__}: {e}", None))
            shutdown()
            raise
    outcome = broadcast_object(outcome)
    if outcome[0] != "ok":
        shutdown()
        if outcome[0] == "bug":
            raise RuntimeError(outcome[1])
        raise UserError(outcome[1], hint=outcome[2])
    try:
        return train_worker(cfg, resume, outcome[1])
    finally:
        if lock is not None:
            lock.release()


def _spawned_worker(cfg: TrainConfig, resume: Path | None, run_id: str) -> None:
    try:
        train_worker(cfg, resume, run_id)
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            atomic_write_json(cfg.resolved_out() / WORKER_ERROR_FILE, {"message": e.message, "hint": e.hint})
        raise


def _result_from_files(out: Path) -> FitResult:
    status = read_json_file(out / STATUS_FILE) or {}
    report = read_json_file(out / "report.json")
    return FitResult(out, report, status.get("iteration", 0), status.get("state") == "interrupted")


def read_json_file(path: Path) -> Any:
    """A JSON file hiposeg wrote (status, report), or None when it does not exist."""
    if not path.exists():
        return None
    try:
        return load_json(path.read_bytes(), str(path))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The data and run folders as absolute paths, so the config and checkpoints saved in the run
    name them wherever a later `--resume` or `eval` is started from."""
    data = cfg.data.model_copy(update={"root": Path(os.path.abspath(cfg.data.resolved_root()))})
    run = cfg.run.model_copy(update={"out": Path(os.path.abspath(cfg.resolved_out()))})
    return cfg.model_copy(update={"data": data, "run": run})


def ensure_prepared(cfg: TrainConfig, resume: Path | None = None) -> None:
    """The built-in synthetic set is generated on the fly; anything else must be prepared. A resumed
    run never regenerates its data: it must find the data it was trained on."""
    from hiposeg.data.dataset import open_prepared, prepare_command

    root = cfg.data.resolved_root()
    if resume is not None and not (root / "manifest.json").exists():
        raise UserError(f"no prepared dataset at {os.path.abspath(root)}, the data of the run resumed from {resume}",
                        hint="Pass --data DIR with the folder the prepared dataset is in now; or prepare it again "
                             f"there: `{prepare_command(root, cfg.data.dataset)}`.")
    if cfg.data.dataset == "synthetic" and not (root / "manifest.json").exists():
        from hiposeg.data.synthetic import generate

        if not cfg.run.quiet:
            print(f"hiposeg: no prepared synthetic set at {root}; generating the built-in one now "
                  f"(same as `hiposeg prepare synthetic --out {root}`)", flush=True)
        generate(root)
    open_prepared(root, cfg.data.train_split, cfg.data.dataset)
    open_prepared(root, cfg.data.val_split, cfg.data.dataset)


# ==========================================================================================
# The run directory: one owner, one run
# ==========================================================================================


def open_run(cfg: TrainConfig, resume: Path | None) -> tuple[DirectoryLock, str]:
    """Everything the launching process checks before the first write: the output path, the data,
    the lock on the run directory, that it can be written, and which run it holds. Returns the held
    lock and the run id this run writes under."""
    from hiposeg.data.dataset import refuse_prepared_dataset

    out = cfg.resolved_out()
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise UserError(f"run directory {out} cannot be created: {blocker} is a file, not a folder",
                        hint="Choose another --out (a folder, or a new name to create).")
    refuse_prepared_dataset(out, "run directory")
    refuse_foreign_folder(out)
    ensure_prepared(cfg, resume)
    lock = DirectoryLock(out, "run directory").acquire()
    try:
        check_writable(out, "run directory")
        run_id = check_run_dir(out, resume)
    except BaseException:
        lock.release()
        raise
    return lock, run_id


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def check_run_dir(out: Path, resume: Path | None) -> str:
    """The run id to write under, after the rules (README "Checkpoints and resume"):

    * (a folder holding files that are not a hiposeg run was refused before: `refuse_foreign_folder`);
    * without --resume: a folder holding a checkpoint is refused; a run killed before its first
      checkpoint is started over (new id);
    * with --resume X: a new or empty folder continues X's run there; a folder holding a run
      continues it only if it is X's own run, and never from an older checkpoint than its last.pt."""
    last = out / "checkpoints" / "last.pt"
    if resume is None:
        if last.exists():
            raise UserError(f"run directory {out} already holds a checkpoint (checkpoints/last.pt)",
                            hint=f"Continue it with `--resume --out {out}`, or choose a new --out.")
        return new_run_id()
    mine = checkpoint_summary(resume)
    if not any((out / m).exists() for m in RUN_MARKERS):
        return mine["run_id"] or new_run_id()  # continue the run in a new place
    same_file = last.exists() and Path(resume).resolve() == last.resolve()
    theirs = run_id_of(out)
    if theirs is not None and mine["run_id"] is not None:
        same_run = theirs == mine["run_id"]
    else:  # a run from before run ids: its checkpoint must come from this directory
        same_run = Path(resume).resolve().parent == (out / "checkpoints").resolve()
    if not (same_file or same_run):
        raise UserError(f"{out} holds another run (run id {theirs or 'unrecorded'}) than the checkpoint {resume} "
                        f"(run id {mine['run_id'] or 'unrecorded'}): resuming would replace its checkpoints and "
                        "mix its logs",
                        hint="Resume into the checkpoint's own run directory, or into a new --out.")
    if not same_file and last.exists():
        at = checkpoint_summary(last)["iteration"]
        if at is not None and mine["iteration"] is not None and at > mine["iteration"]:
            raise UserError(f"resuming {resume} (iteration {mine['iteration']}) into {out} would replace its "
                            f"checkpoints/last.pt (iteration {at})",
                            hint=f"Resume from {last}, or continue from {resume} in a new --out.")
    return mine["run_id"] or theirs or new_run_id()


def refuse_foreign_folder(out: Path) -> None:
    """A folder holding files that are not a hiposeg run is not written into (not even a lock file)."""
    foreign = foreign_entries(out)
    if foreign:
        raise UserError(f"{out} is not a hiposeg run directory: it holds {', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}",
                        hint="Choose a new or empty --out; hiposeg does not write into a folder of other files.")


def foreign_entries(out: Path) -> list[str]:
    """What makes `out` a folder of other files: its entries, unless it is a run directory (it holds a
    run's marker files, whatever else the user put there) or holds only a lock or temp files."""
    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir())
    if any(m in names for m in RUN_MARKERS):
        return []
    return [n for n in names if n not in (LOCK_NAME, WORKER_ERROR_FILE) and not n.startswith(TMP_PREFIX)]


def run_id_of(out: Path) -> str | None:
    """The id of the run in `out`: from status.json, else from its last checkpoint (older runs: None)."""
    status = read_json_file(out / STATUS_FILE)
    if isinstance(status, dict) and status.get("run_id"):
        return str(status["run_id"])
    last = out / "checkpoints" / "last.pt"
    return checkpoint_summary(last)["run_id"] if last.exists() else None


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """A checkpoint's run id and iteration, read memory-mapped (its tensors stay on disk)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any failure: the full loader explains it (corrupt, unsafe, not hiposeg)
        ck = checkpoint.load(path)
    if not isinstance(ck, dict):
        ck = checkpoint.load(path)
    return {"run_id": ck.get("run_id"), "iteration": ck.get("iteration")}


# ==========================================================================================
# Data: an infinite, resumable, rank-aware stream of (index, augmentation seed)
# ==========================================================================================


class IterationSampler(Sampler[tuple[int, int]]):
    """Global sample position p = iteration * global_batch + rank * local_batch + j.

    Position p is item `perm_e[p mod n]` of epoch e = p // n, where perm_e is a permutation seeded
    by (seed, e); its augmentation seed is a hash of (seed, p). So the data a step sees depends only
    on the seed and the iteration: not on the worker count, the rank count, or interruptions.
    """

    def __init__(self, n: int, local_batch: int, rank: int, world: int, seed: int, start_iter: int) -> None:
        if n == 0:
            raise UserError("the training split is empty")
        self.n, self.b, self.rank, self.world, self.seed, self.start = n, local_batch, rank, world, seed, start_iter
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def __iter__(self) -> Iterator[tuple[int, int]]:
        it = self.start
        global_batch = self.b * self.world
        while True:
            for j in range(self.b):
                p = it * global_batch + self.rank * self.b + j
                epoch, k = divmod(p, self.n)
                yield int(self._perm_of(epoch)[k]), (self.seed * 7_919 + p * 104_729 + 12_345) % (2**63 - 1)
            it += 1


def build_train_loader(cfg: TrainConfig, env: DistEnv, start_iter: int) -> tuple[DataLoader, Any]:
    from hiposeg.data.dataset import PreparedDataset
    from hiposeg.data.transforms import train_transforms

    d = cfg.data
    probe = PreparedDataset(d.resolved_root(), d.train_split, transforms=None, levels=("fine",))
    tf = train_transforms(d.crop, d.scale_range, d.hflip, d.color_jitter, d.mean, d.std, probe.hierarchy.ignore_index)
    ds = PreparedDataset(d.resolved_root(), d.train_split, transforms=tf, levels=("fine",), check_values=True)
    local_batch = cfg.optim.batch_size // env.world_size
    sampler = IterationSampler(len(ds), local_batch, env.rank, env.world_size, cfg.run.seed, start_iter)
    loader = DataLoader(ds, batch_size=local_batch, sampler=sampler, num_workers=d.workers,
                        pin_memory=env.device.type == "cuda", persistent_workers=d.workers > 0,
                        prefetch_factor=4 if d.workers > 0 else None, drop_last=False)
    return loader, ds.hierarchy


# ==========================================================================================
# Model, optimiser, schedule
# ==========================================================================================


def build_model(cfg: TrainConfig, hierarchy: Hierarchy) -> tuple[nn.Module, nn.Module]:
    """(HiPoSegNet training wrapper, HiPoSegCriterion). No projection head for a CE-only config."""
    from hiposeg.model import HiPoSegNet, build_segmenter
    from hiposeg.prototypes import HiPoSegCriterion

    criterion = HiPoSegCriterion(cfg.loss, hierarchy.fine_to_coarse, cfg.model.embed_dim,
                                 hierarchy.ignore_index, cfg.optim.iters)
    segmenter = build_segmenter(cfg.model, hierarchy.num_fine)
    net = HiPoSegNet(segmenter, embed_dim=cfg.model.embed_dim, embed_source=cfg.model.embed_source,
                     with_projection=criterion.needs_embeddings)
    return net, criterion


def poly_lr(cfg: TrainConfig, iteration: int) -> float:
    """Poly decay (power 0.9 in the paper) with an optional linear warm-up."""
    o = cfg.optim
    lr = o.lr * (1 - iteration / o.iters) ** o.poly_power
    if o.warmup_iters and iteration < o.warmup_iters:
        lr *= (iteration + 1) / o.warmup_iters
    return lr


def configure_determinism(cfg: TrainConfig) -> None:
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2**32)
    random.seed(cfg.run.seed)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def autocast_for(cfg: TrainConfig, device: torch.device):  # type: ignore[no-untyped-def]
    if cfg.run.amp == "off":
        return nullcontext()
    dtype = torch.float16 if cfg.run.amp == "fp16" else torch.bfloat16
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("--amp fp16 needs a CUDA GPU", hint="Use --amp bf16 on the CPU, or --amp off.")
    return torch.autocast(device_type=device.type, dtype=dtype)


# ==========================================================================================
# Checkpoints
# ==========================================================================================


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def make_checkpoint(cfg: TrainConfig, hierarchy: Hierarchy, net: nn.Module, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, iteration: int,
                    best: dict[str, Any], last_eval: dict[str, Any] | None, run_id: str) -> dict[str, Any]:
    return {
        "format": checkpoint.CHECKPOINT_FORMAT,
        "hiposeg_version": __version__,
        "torch_version": str(torch.__version__),
        "run_id": run_id,
        "iteration": iteration,
        "config": cfg.to_plain(),
        "hierarchy": hierarchy.to_dict(),
        "hierarchy_sha256": hierarchy.sha256,
        "model": net.segmenter.state_dict(),
        "projection": net.projection.state_dict() if net.projection is not None else {},
        "memory": criterion.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "best": best,
        "last_eval": last_eval,
    }


def restore_model(ckpt: dict[str, Any], path: Path, net: nn.Module, criterion: nn.Module) -> None:
    """The segmenter, projection head and prototype memory of a checkpoint, each checked to fit."""
    checkpoint.restore(path, "model", lambda: net.segmenter.load_state_dict(ckpt["model"]))
    if net.projection is not None:
        checkpoint.restore(path, "projection", lambda: net.projection.load_state_dict(ckpt["projection"]))
    checkpoint.restore(path, "memory", lambda: criterion.load_state_dict(ckpt["memory"]))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict`, which does not compare the buffers' shapes with the parameters'
    (a mismatch would fail only at the first step, deep inside SGD)."""
    optimizer.load_state_dict(state)
    for param, buffers in optimizer.state.items():
        for name, value in buffers.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise ValueError(f"{name} of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}")


def check_compatible(ckpt: dict[str, Any], path: Path, hierarchy: Hierarchy, cfg: TrainConfig) -> None:
    """Refuse a checkpoint of another hierarchy or architecture, saying which."""
    if ckpt.get("hierarchy_sha256") != hierarchy.sha256:
        theirs = ckpt.get("hierarchy", {}).get("name", "?")
        raise UserError(f"checkpoint {path} was trained with hierarchy {theirs!r} (sha256 "
                        f"{str(ckpt.get('hierarchy_sha256'))[:12]}), but the data at {cfg.data.resolved_root()} uses "
                        f"{hierarchy.name!r} ({hierarchy.sha256[:12]})",
                        hint="Resume with the dataset the run was trained on, or start a new run.")
    theirs_model = ckpt.get("config", {}).get("model", {})
    for key in ("backbone", "output_stride", "embed_dim", "embed_source"):
        if theirs_model.get(key) != getattr(cfg.model, key):
            raise UserError(f"checkpoint {path} has model.{key}={theirs_model.get(key)!r}, but the configuration "
                            f"asks for {getattr(cfg.model, key)!r}",
                            hint="Resume with the run's own configuration (drop the conflicting flag).")


# ==========================================================================================
# Logging: Rich progress on a terminal, plain lines otherwise, metrics.jsonl, TensorBoard
# ==========================================================================================


class RunLogger:
    """Rank 0 only. Writes `metrics.jsonl` (one JSON object per log step / evaluation)."""

    def __init__(self, out: Path, cfg: TrainConfig, start_iter: int, fresh: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.cfg, self.total = cfg, cfg.optim.iters
        self.console = Console(stderr=True, quiet=cfg.run.quiet)
        # a new run starts its log afresh (a run killed before its first checkpoint is started over)
        self.metrics = open(out / "metrics.jsonl", "w" if fresh else "a", encoding="utf-8")  # noqa: SIM115
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # the optional `tensorboard` extra is not installed
            self.tb = None
        self.progress = None
        if self.console.is_terminal and not cfg.run.quiet:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TextColumn("{task.fields[speed]}"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}", markup=False), console=self.console)
            self.task = self.progress.add_task("train", total=self.total, completed=start_iter, speed="", info="")
            self.progress.start()
        self._t0, self._i0 = time.perf_counter(), start_iter

    def step(self, iteration: int, lr: float, phase: str, terms: dict[str, float]) -> None:
        now = time.perf_counter()
        speed = (iteration - self._i0) / max(now - self._t0, 1e-9)
        self._t0, self._i0 = now, iteration
        row = {"iter": iteration, "lr": lr, "phase": phase, "it_per_s": speed, **terms}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in terms.items():
                self.tb.add_scalar(f"train/{k}", v, iteration)
            self.tb.add_scalar("train/lr", lr, iteration)
        info = " ".join(f"{k}={v:.3f}" for k, v in terms.items()) + f" lr={lr:.2e} [{phase}]"
        if self.progress is not None:
            self.progress.update(self.task, completed=iteration, speed=f"{speed:.2f} it/s", info=info)
        elif not self.cfg.run.quiet:
            eta = (self.total - iteration) / max(speed, 1e-9)
            self.print(f"iter {iteration}/{self.total}  {speed:.2f} it/s  eta {eta / 60:.1f} min  {info}")

    def evaluation(self, iteration: int, report: dict[str, Any]) -> None:
        row = {"iter": iteration, "eval": {k: lv["mIoU"] for k, lv in report["levels"].items()}}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, lv in report["levels"].items():
                if lv["mIoU"] is not None:
                    self.tb.add_scalar(f"val/mIoU_{k}", lv["mIoU"], iteration)
        self.print(f"eval @ {iteration}: {summary_line(report)}")

    def print(self, msg: str, style: str | None = None) -> None:
        """Plain text (paths and class names may hold `[...]`: never parsed as Rich markup)."""
        from rich.text import Text

        if self.progress is not None:
            self.progress.console.print(Text(msg, style=style or ""), highlight=False)
        elif not self.cfg.run.quiet:
            self.console.print(Text(msg, style=style or ""), highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next iteration boundary and stops."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ==========================================================================================
# The worker: everything one process does
# ==========================================================================================


def train_worker(cfg: TrainConfig, resume: Path | None, run_id: str) -> FitResult:
    """One training process. The run directory is already claimed by the launching process (`fit`)."""
    env = init_from_env(cfg.run.device)
    if env.distributed and env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N CPU processes share the cores instead of each starting one thread per core
        local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    out = cfg.resolved_out()
    try:
        return _train(cfg, resume, env, run_id)
    except TrainingDiverged as e:
        if env.is_main:  # say so in the run directory too: ablate and schedulers read status.json
            old = read_json_file(out / STATUS_FILE) or {}
            atomic_write_json(out / STATUS_FILE, {**old, "state": "diverged", "error": e.message})
        raise
    except OSError as e:
        if not is_write_failure(e, out):
            raise
        # the run's logs, status, config or report (checkpoint writes report it themselves)
        what = e.filename or f"to {out}"
        lead = (f"no space left on the device while writing {what}" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else f"cannot write {what}: {e.strerror or e}")
        raise UserError(lead, hint="The last checkpoint written is intact. Free disk space or make the folder "
                                   f"writable (or choose another --out), then continue with "
                                   f"`hiposeg train --resume --out {out}`.") from None
    finally:
        shutdown()


def is_write_failure(e: OSError, out: Path) -> bool:
    """A failed write into the run directory (full, read-only, forbidden), not a bug or a read error."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    if e.filename is None:
        return False
    path = os.path.abspath(e.filename)
    return path == os.path.abspath(out) or path.startswith(os.path.abspath(out) + os.sep)


def _train(cfg: TrainConfig, resume: Path | None, env: DistEnv, run_id: str) -> FitResult:
    if cfg.optim.batch_size % env.world_size:
        raise UserError(f"batch size {cfg.optim.batch_size} does not split evenly over {env.world_size} processes",
                        hint=f"Use a multiple of {env.world_size} for --batch-size (it is the total over all processes).")
    sync_bn = env.distributed and env.device.type == "cuda"
    if cfg.optim.batch_size // env.world_size < 2 and not sync_bn:
        raise UserError(f"batch size {cfg.optim.batch_size} over {env.world_size} process(es) leaves 1 image per "
                        "process: BatchNorm after ASPP's image pooling cannot train on a single 1x1 value",
                        hint=f"Use --batch-size {2 * env.world_size} or more (SyncBatchNorm on GPUs lifts this).")
    out = cfg.resolved_out()
    ckpt_dir = out / "checkpoints"
    configure_determinism(cfg)

    from hiposeg.data.dataset import open_prepared

    hierarchy, _ = open_prepared(cfg.data.resolved_root(), cfg.data.train_split)
    net, criterion = build_model(cfg, hierarchy)
    ckpt = checkpoint.load(resume) if resume is not None else None
    if ckpt is not None:
        check_compatible(ckpt, resume, hierarchy, cfg)  # type: ignore[arg-type]
        restore_model(ckpt, resume, net, criterion)  # type: ignore[arg-type]
    if sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # global BN statistics: the batch is global
    net.to(env.device)
    criterion.to(env.device)
    if cfg.run.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.run.amp == "fp16")
    start_iter, best, last_eval = 0, {"metric": "fine_mIoU", "value": None, "iteration": None}, None
    if ckpt is not None:
        checkpoint.restore(resume, "optimizer", lambda: load_optimizer_state(optimizer, ckpt["optimizer"]))
        checkpoint.restore(resume, "scaler", lambda: scaler.load_state_dict(ckpt["scaler"]))
        start_iter, best, last_eval = int(ckpt["iteration"]), ckpt["best"], ckpt.get("last_eval")

    model: nn.Module = net
    if env.distributed:
        # CPU processes use plain BN (SyncBN needs CUDA); rank 0's BN buffers are broadcast each
        # forward so every rank evaluates the same model. The prototype memory is kept identical
        # by the criterion itself (all-reduced sums and counts).
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            forward_sync_buffers=env.device.type != "cuda")
    if cfg.run.compile:
        model = torch.compile(model)

    loader, _ = build_train_loader(cfg, env, start_iter)
    batches = iter(loader)  # created before restoring RNG: creating it draws from the RNG
    if ckpt is not None:
        checkpoint.restore(resume, "rng", lambda: set_rng_state(ckpt["rng"]))
        del ckpt

    logger = None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(ckpt_dir)  # this process owns the directory (fit's lock): no temp file is live
        save_config(cfg, out / "config.yaml")
        logger = RunLogger(out, cfg, start_iter, fresh=resume is None)
        atomic_write_json(out / STATUS_FILE, {"state": "running", "iteration": start_iter, "run_id": run_id})
        if start_iter:
            logger.print(f"resumed from {resume} at iteration {start_iter}")

    def save(name: str, iteration: int) -> None:
        if env.is_main:
            checkpoint.save(make_checkpoint(cfg, hierarchy, net, criterion, optimizer, scaler, iteration,
                                            best, last_eval, run_id), ckpt_dir / f"{name}.pt")

    def run_eval(iteration: int) -> dict[str, Any]:
        nonlocal best, last_eval
        if env.distributed and not sync_bn:
            broadcast_buffers_(net)  # every rank evaluates (and saves) rank 0's BN statistics
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            report = evaluate(net.segmenter, cfg.data.resolved_root(), cfg.data.val_split, env,
                              mode=cfg.run.eval_mode, crop=cfg.data.crop, batch_size=cfg.run.eval_batch_size,
                              amp=cfg.run.amp, mean=cfg.data.mean, std=cfg.data.std, workers=cfg.data.workers,
                              iteration=iteration)
        net.train()
        last_eval = {k: lv["mIoU"] for k, lv in report["levels"].items()}
        fine = report["levels"]["fine"]["mIoU"]
        improved = fine is not None and (best["value"] is None or fine > best["value"])
        if improved:
            best = {"metric": "fine_mIoU", "value": fine, "iteration": iteration}
        if logger:
            logger.evaluation(iteration, report)
        if improved:
            save("best", iteration)
        return report

    T = cfg.optim.iters
    sums: dict[str, torch.Tensor] = {}
    n_logged = 0
    iteration = start_iter
    report: dict[str, Any] | None = None
    interrupted = False
    net.train()
    with StopSignal() as stop:
        while iteration < T:
            if any_rank(stop.signum is not None, env.device) if env.distributed else stop.signum is not None:
                interrupted = True
                break
            batch = next(batches)
            images = batch["image"].to(env.device, non_blocking=True)
            target = batch["fine"].to(env.device, non_blocking=True)
            if cfg.run.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            lr = poly_lr(cfg, iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr

            with autocast_for(cfg, env.device):
                logits, emb = model(images, with_embeddings=criterion.needs_embeddings)
            loss, terms = criterion(logits, emb, target, iteration)

            bad = not bool(torch.isfinite(loss.detach()))
            if env.distributed:
                bad = any_rank(bad, env.device)
            if bad:
                detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                broken = [k for k, v in terms.items() if not bool(torch.isfinite(v))]
                where = f" in term{'s' * (len(broken) > 1)} {', '.join(broken)}" if broken else ""
                kept = ckpt_dir / "last.pt"
                raise TrainingDiverged(
                    f"the loss became non-finite at iteration {iteration}{where} "
                    f"({detail or 'total=' + str(float(loss))})",
                    hint=(f"The last good checkpoint is kept: {kept}. " if kept.exists() else "No checkpoint was "
                          "written yet. ") + "Try a lower --lr, --amp bf16 instead of fp16, or check the labels "
                          "(`hiposeg prepare` manifest).")

            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iteration += 1

            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            n_logged += 1
            if iteration % cfg.run.log_every == 0 or iteration == T:
                means = mean_over_ranks(sums, n_logged, env)
                if logger:
                    logger.step(iteration, lr, criterion.schedule.phase_name(iteration - 1), means)
                sums, n_logged = {}, 0

            if cfg.run.eval_every and iteration % cfg.run.eval_every == 0 and iteration < T:
                run_eval(iteration)
            if iteration % cfg.run.ckpt_every == 0 and iteration < T:
                save("last", iteration)

        if interrupted:
            if env.distributed and not sync_bn:
                broadcast_buffers_(net)
            save("last", iteration)
            if logger:
                sig = signal.Signals(stop.signum).name if stop.signum else "signal"
                logger.print(f"{sig}: stopped at iteration {iteration}; checkpoint written to {ckpt_dir / 'last.pt'}. "
                             f"Continue with `hiposeg train --resume --out {out}`.")
        else:
            save("last", iteration)  # the trained weights are safe before the final evaluation can fail
            report = run_eval(iteration)
            save("last", iteration)  # again, with the final evaluation's best / last_eval
            if env.is_main:
                atomic_write_json(out / "report.json", report)

    digests = rank_digests(net, criterion)
    if logger:
        atomic_write_json(out / STATUS_FILE, {"state": "interrupted" if interrupted else "finished",
                                              "iteration": iteration, "run_id": run_id, "rank_digests": digests})
        if len(set(digests)) > 1:
            logger.print(f"warning: the {len(digests)} processes ended with different weights or prototype "
                         f"memory ({digests}); please report this as a bug", style="red")
        logger.close()
    return FitResult(out, report, iteration, interrupted, is_main=env.is_main)


def mean_over_ranks(sums: dict[str, torch.Tensor], n: int, env: DistEnv) -> dict[str, float]:
    """Average logged sums over steps and ranks. Under DDP the pixel-averaged terms (ce, fh, fl) of
    one rank are its share of the global mean, so only the mean over ranks is the batch's value."""
    keys = list(sums)
    vec = torch.stack([torch.as_tensor(sums[k], device=env.device).float() for k in keys]) / n
    if env.distributed:
        import torch.distributed as dist

        dist.all_reduce(vec)
        vec /= env.world_size
    return dict(zip(keys, vec.tolist()))


def state_digest(*modules: nn.Module) -> str:
    """sha256 over every tensor of the modules' state dicts (weights, BN buffers, prototype memory)."""
    import hashlib

    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rank_digests(net: nn.Module, criterion: nn.Module) -> list[str]:
    """The state digest of every rank (one entry when not distributed): DDP must keep them equal."""
    import torch.distributed as dist

    mine = state_digest(net, criterion)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, mine)
    return box


# ==========================================================================================
# Evaluation
# ==========================================================================================


@torch.no_grad()
def evaluate(segmenter: nn.Module, data_root: Path, split: str, env: DistEnv | None = None, *,
             mode: str = "auto", crop: tuple[int, int] = (512, 1024), batch_size: int = 1, amp: str = "off",
             mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
             std: tuple[float, float, float] = (0.229, 0.224, 0.225), workers: int = 2, iteration: int | None = None,
             save_predictions: Path | None = None, progress: bool = False, invalid_gt: str = "error") -> dict[str, Any]:
    """IoU at every level over a whole prepared split, at the labels' full resolution.

    Under DDP each rank takes every world_size-th image (no padding duplicates), and the confusion
    matrices are summed across ranks before any IoU is computed. Ground-truth values that are
    neither a class nor ignore stop the evaluation (`invalid_gt="error"`: at the first such batch in
    one process, after the split under DDP so every rank stops together) or are counted and
    reported (`"ignore"`).
    """
    from hiposeg.data.dataset import PreparedDataset
    from hiposeg.data.transforms import eval_transforms

    env = env or DistEnv(device=next(segmenter.parameters()).device)
    was_training = segmenter.training
    segmenter.eval()
    probe = PreparedDataset(data_root, split, transforms=None, levels=("fine",))
    h = probe.hierarchy
    ds = PreparedDataset(data_root, split, transforms=eval_transforms(mean, std),
                         levels=("fine",))
    gt_dir = Path(data_root) / split / "fine"
    shard = torch.utils.data.Subset(ds, list(range(env.rank, len(ds), env.world_size)))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=env.device.type == "cuda")
    cm = ConfusionMatrix(h.num_fine, env.device)
    amp_ctx = (torch.autocast(env.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
               if amp != "off" and not (amp == "fp16" and env.device.type == "cpu") else nullcontext())
    bar = _eval_progress(progress and env.is_main, len(shard))
    try:
        for batch in loader:
            images = batch["image"].to(env.device, non_blocking=True)
            target = batch["fine"].to(env.device, non_blocking=True)
            with amp_ctx:
                logits = predict_logits(segmenter, images, h.num_fine, mode=mode, crop=crop)  # type: ignore[arg-type]
            pred = logits.argmax(1)
            cm.update(pred, target, h.ignore_index, files=[str(gt_dir / f"{s}.png") for s in batch["stem"]])
            if not env.distributed and cm.invalid:
                cm.check_ground_truth(invalid_gt, h.ignore_index)  # "error": stop at the first such file
            if save_predictions is not None:
                _save_predictions(save_predictions, batch["stem"], pred, h.label_dtype)
            if bar:
                bar[0].advance(bar[1], len(images))
    finally:
        if bar:
            bar[0].stop()
    cm.all_reduce()
    if was_training:
        segmenter.train()
    meta: dict[str, Any] = {"split": split, "data": str(data_root), "images": len(ds), "mode": mode}
    if iteration is not None:
        meta["iteration"] = iteration
    return build_report(cm.numpy(), h, **meta, **ground_truth_note(cm, invalid_gt, h.ignore_index))


def ground_truth_note(cm: ConfusionMatrix, invalid_gt: str, ignore_index: int) -> dict[str, Any]:
    """report.json's "invalid_ground_truth" entry (policy "ignore"), {} when the ground truth is valid;
    raises `InvalidGroundTruth` under policy "error"."""
    invalid = cm.check_ground_truth(invalid_gt, ignore_index)
    return {} if invalid is None else {"invalid_ground_truth": invalid}


def _save_predictions(folder: Path, stems: list[str], pred: torch.Tensor, dtype: Any) -> None:
    """Write a batch's fine-id maps as `{stem}.png`; a failed write is one clear error."""
    from hiposeg.data.dataset import write_label
    from hiposeg.atomic import write_failure

    for stem, p in zip(stems, pred.cpu().numpy()):
        path = folder / f"{stem}.png"
        try:
            write_label(path, p.astype(dtype))
        except OSError as e:
            raise UserError(f"could not write prediction {write_failure(e, path)}",
                            hint="Free disk space or choose another --save-predictions folder.") from None


def _eval_progress(enabled: bool, total: int):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 transient=True)
    task = p.add_task("eval", total=total)
    p.start()
    return p, task


def evaluate_predictions(pred_dir: Path, data_root: Path, split: str, *, invalid_gt: str = "error") -> dict[str, Any]:
    """Score label PNGs from any tool (`{stem}.png`, fine ids) against a prepared split."""
    from hiposeg.data.dataset import PreparedDataset, read_label

    ds = PreparedDataset(data_root, split, transforms=None, levels=("fine",))
    h = ds.hierarchy
    cm = ConfusionMatrix(h.num_fine)
    missing = [s for s in ds.stems if not (pred_dir / f"{s}.png").exists()]
    if missing:
        raise UserError(f"{len(missing)} of {len(ds.stems)} predictions are missing in {pred_dir}, "
                        f"e.g. {missing[0]}.png",
                        hint="Predictions must be named {stem}.png (one per image of the split), holding fine class ids.")
    gt_dir = Path(data_root) / split / "fine"
    for stem in ds.stems:
        gt = read_label(gt_dir / f"{stem}.png")
        pred = read_label(pred_dir / f"{stem}.png")
        if pred.ndim != 2:
            raise UserError(f"prediction {pred_dir / (stem + '.png')} has {pred.shape[2]} channels; expected a "
                            "single-channel map of fine class ids")
        if pred.shape != gt.shape:
            raise UserError(f"prediction {pred_dir / (stem + '.png')} is {pred.shape[1]}x{pred.shape[0]} but the "
                            f"label is {gt.shape[1]}x{gt.shape[0]}",
                            hint="Predictions must be at the label's full resolution.")
        cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)), h.ignore_index,
                  files=[str(gt_dir / f"{stem}.png")])
        if cm.invalid:
            cm.check_ground_truth(invalid_gt, h.ignore_index)  # "error": stop at the first such file
    return build_report(cm.numpy(), h, split=split, data=str(data_root), images=len(ds.stems),
                        predictions=str(pred_dir), **ground_truth_note(cm, invalid_gt, h.ignore_index))
