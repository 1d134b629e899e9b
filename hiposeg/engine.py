"""The training loop: `fit(config)` serves `hiposeg train` and every `hiposeg ablate` run.

Read top to bottom:
    fit            launch N processes if asked (`--gpus N`, torchrun), else `train_worker` here
    train          one process: setup -> restore (--resume) -> begin -> step ... -> end
    step           poly lr -> forward (AMP) -> eq. 14 -> finite check -> backward -> optimiser step
    after_step     log, evaluate, checkpoint on their cadences; SIGINT/SIGTERM stop the loop at the
                   next iteration boundary, with a checkpoint
    end            the last checkpoint, the final evaluation (report.json), status.json

Elsewhere: the run directory, its lock and the resume rules (`rundir`; the launching process holds
the lock from before the first write to the end), what a checkpoint holds (`checkpoint`),
evaluation (`evaluate`), logging (`runlog`), the losses (`prototypes`).

Exact resume: data order and augmentation are pure functions of (seed, global sample position)
(`data.sampler`), the lr is a function of the iteration, and checkpoints carry the model,
prototype memory, optimiser, scaler and RNG states, so an interrupted run resumed with `--resume`
ends with the same weights as an uninterrupted one (bit-exact in `--deterministic` mode).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hiposeg import checkpoint, rundir
from hiposeg.atomic import atomic_write_json
from hiposeg.checkpoint import restore_model
from hiposeg.compile import CompiledOrEager
from hiposeg.config import TrainConfig
from hiposeg.data.sampler import train_loader
from hiposeg.distributed import (DistEnv, StopSignal, any_rank, broadcast_buffers_, check_world, decided_on_rank0,
                                 init_from_env, launch_of, pick_device, rank_digests, share_cpu_cores, shutdown,
                                 spawn_reporting)
from hiposeg.errors import UserError
from hiposeg.evaluate import autocast, eval_dataset, eval_loader, evaluate
from hiposeg.hierarchy import Hierarchy
from hiposeg.lock import DirectoryLock
from hiposeg.runlog import RunLogger, TermMeter


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
# Launch: this process, N spawned workers, or one rank of a torchrun group
# ==========================================================================================


def fit(cfg: TrainConfig, *, resume: Path | None = None) -> FitResult:
    """Train (and finally evaluate) per `cfg`; `resume` is a checkpoint file to continue from."""
    cfg = as_launched(cfg.with_absolute_paths())
    if cfg.run.launcher == "torchrun":
        return _fit_under_torchrun(cfg, resume)
    lock, run_id = open_run(cfg, resume)
    try:
        if cfg.run.launcher == "spawn":
            return _fit_spawned(cfg, resume, run_id, cfg.run.gpus)
        return train_worker(cfg, resume, run_id)
    finally:
        lock.release()


def as_launched(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the run's real world size (`run.gpus`) and how it was started (`run.launcher`), as
    config.yaml, the checkpoints and the header record them (`distributed.launch_of`)."""
    world, launcher = launch_of(cfg.run.gpus)
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"gpus": world, "launcher": launcher})})


def _fit_spawned(cfg: TrainConfig, resume: Path | None, run_id: str, world: int) -> FitResult:
    """`--gpus N`: this process holds the run directory; the N workers it starts write into it."""
    out = cfg.resolved_out()
    spawn_reporting(world, train_worker, (cfg, resume, run_id), out / rundir.WORKER_ERROR_FILE)
    status = rundir.read_json(out / rundir.STATUS_FILE) or {}
    report = rundir.read_json(out / rundir.REPORT_FILE)
    return FitResult(out, report, status.get("iteration", 0), status.get("state") == "interrupted")


def _fit_under_torchrun(cfg: TrainConfig, resume: Path | None) -> FitResult:
    """Every rank joins the group; global rank 0 opens the run (data, lock, run-directory rules) and
    gives the others its run id, or its refusal."""
    env = init_from_env(cfg.run.device)
    lock, run_id = decided_on_rank0(env, lambda: open_run(cfg, resume))
    try:
        return train_worker(cfg, resume, run_id)
    finally:
        if lock is not None:
            lock.release()


def open_run(cfg: TrainConfig, resume: Path | None) -> tuple[DirectoryLock, str]:
    """Everything the launching process checks before the first write: the output path, the model
    family's packages (before data is generated), the data, what the workers would refuse (with the
    pretrained weights of a new run, downloaded into the library's cache once), then the lock on the
    run directory and which run it holds (`rundir.claim`)."""
    from hiposeg.models import check_model

    out = cfg.resolved_out()
    rundir.check_target(out)
    check_model(cfg.model, with_weights=False)  # a missing optional package first, before data is generated
    hierarchy = ensure_prepared(cfg, resume)
    check_before_start(cfg, hierarchy, resume)
    return rundir.claim(out, resume)


def check_before_start(cfg: TrainConfig, hierarchy: Hierarchy, resume: Path | None) -> None:
    """What the training processes would refuse only after the run directory was claimed and they were
    started: devices, batch split, precision, pretrained file, a checkpoint that does not fit."""
    device = pick_device(cfg.run.device)
    check_world(cfg.run.gpus, cfg.run.device)
    check_batch_split(cfg, cfg.run.gpus, sync_bn=cfg.run.gpus > 1 and device.type == "cuda")
    autocast(cfg.run.amp, device)
    if resume is None and cfg.model.pretrained is not None:  # a resumed run takes its weights from the checkpoint
        from hiposeg.models import build_segmenter

        # ImageNet weights land in the library's cache here, once; a file is read and checked as each worker will
        build_segmenter(cfg.model, hierarchy.num_fine)
    if resume is not None:
        checkpoint.check_compatible(checkpoint.peek(resume), resume, hierarchy, cfg)


def ensure_prepared(cfg: TrainConfig, resume: Path | None = None) -> Hierarchy:
    """The built-in synthetic set is generated on the fly; anything else must be prepared. A resumed
    run never regenerates its data: it must find the data it was trained on. Returns its hierarchy."""
    from hiposeg.data.dataset import moved_dataset_error, open_prepared

    root = cfg.data.resolved_root()
    if resume is not None and not (root / "manifest.json").exists():
        raise moved_dataset_error(root, f"the data of the run resumed from {resume}", cfg.data.dataset)
    if cfg.data.dataset == "synthetic" and not (root / "manifest.json").exists():
        from hiposeg.data.synthetic import generate

        if not cfg.run.quiet:
            print(f"hiposeg: no prepared synthetic set at {root}; generating the built-in one now "
                  f"(same as `hiposeg prepare synthetic --out {root}`)", flush=True)
        generate(root)
    hierarchy, _ = open_prepared(root, cfg.data.train_split, cfg.data.dataset)
    open_prepared(root, cfg.data.val_split, cfg.data.dataset)
    return hierarchy


# ==========================================================================================
# Model, optimiser schedule, seeds
# ==========================================================================================


def build_model(cfg: TrainConfig, hierarchy: Hierarchy, pretrained: bool = True) -> tuple[nn.Module, nn.Module]:
    """(HiPoSegNet training wrapper, HiPoSegCriterion). No projection head for a CE-only config; the
    auxiliary head only with `model.aux_head`; the segmenter's pretrained weights loaded if `pretrained`."""
    from hiposeg.models import build_segmenter
    from hiposeg.models.training import HiPoSegNet
    from hiposeg.prototypes import HiPoSegCriterion

    criterion = HiPoSegCriterion(cfg.loss, hierarchy.fine_to_coarse, cfg.model.embed_dim,
                                 hierarchy.ignore_index, cfg.optim.iters, aux_weight=cfg.model.aux_weight)
    segmenter = build_segmenter(cfg.model, hierarchy.num_fine, pretrained=pretrained)
    net = HiPoSegNet(segmenter, embed_dim=cfg.model.embed_dim, embed_source=cfg.model.embed_source,
                     with_projection=criterion.needs_embeddings, aux_head=cfg.model.aux_head)
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


def check_batch_split(cfg: TrainConfig, world_size: int, sync_bn: bool) -> None:
    if cfg.optim.batch_size % world_size:
        raise UserError(f"batch size {cfg.optim.batch_size} does not split evenly over {world_size} processes",
                        hint=f"Use a multiple of {world_size} for --batch-size (it is the total over all processes).")
    if cfg.optim.batch_size // world_size < 2 and not sync_bn:
        raise UserError(f"batch size {cfg.optim.batch_size} over {world_size} process(es) leaves 1 image per "
                        "process: BatchNorm after ASPP's image pooling cannot train on a single 1x1 value",
                        hint=f"Use --batch-size {2 * world_size} or more (SyncBatchNorm on GPUs lifts this).")


# ==========================================================================================
# One process: setup -> restore -> begin -> step ... -> end
# ==========================================================================================


@dataclass
class Training:
    """Everything one process's loop reads and changes."""

    cfg: TrainConfig
    env: DistEnv
    run_id: str
    hierarchy: Hierarchy
    net: nn.Module  # the HiPoSegNet training wrapper: what checkpoints and evaluations see
    model: Callable[..., Any]  # what the loop calls: `net`, or its DDP / compiled wrapper
    criterion: nn.Module  # HiPoSegCriterion: eq. 14 and the prototype memory
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: AbstractContextManager  # autocast per --amp (`evaluate.autocast`)
    sync_bn: bool
    pretrained: Any = None  # models.LoadReport of a new run started from pretrained weights
    iteration: int = 0  # completed iterations
    best: dict[str, Any] = field(default_factory=lambda: {"metric": "fine_mIoU", "value": None, "iteration": None})
    last_eval: dict[str, Any] | None = None
    batches: Iterator[dict[str, Any]] | None = None
    logger: RunLogger | None = None  # rank 0 only
    meter: TermMeter = field(default_factory=TermMeter)

    @property
    def out(self) -> Path:
        return self.cfg.resolved_out()


def train_worker(cfg: TrainConfig, resume: Path | None, run_id: str) -> FitResult:
    """One training process. The run directory is already claimed by the launching process (`fit`)."""
    env = init_from_env(cfg.run.device)
    share_cpu_cores(env)
    out = cfg.resolved_out()
    finished = False
    try:
        result = train(cfg, resume, env, run_id)
        finished = True
        return result
    except TrainingDiverged as e:
        if env.is_main:
            rundir.mark_diverged(out, e.message)
        raise
    except OSError as e:  # the run's logs, status, config or report (checkpoint writes report it themselves)
        error = rundir.write_error(e, out)
        if error is None:
            raise
        raise error from None
    finally:
        shutdown(together=finished)  # after a finished run every rank is here; after a failure, maybe not


def train(cfg: TrainConfig, resume: Path | None, env: DistEnv, run_id: str) -> FitResult:
    """One process's run, top to bottom."""
    run = setup(cfg, env, run_id, fresh=resume is None)
    saved = restore(run, resume) if resume is not None else None
    begin(run, resume, saved)
    del saved  # the checkpoint's tensors are restored: free them before the loop
    with StopSignal() as stop:
        while run.iteration < cfg.optim.iters:
            if stop_requested(stop, env):
                break
            step(run, next(run.batches))  # type: ignore[arg-type]
            after_step(run)
        return end(run)


def setup(cfg: TrainConfig, env: DistEnv, run_id: str, fresh: bool = True) -> Training:
    """A run at iteration 0: seeds, model (with its pretrained weights when `fresh`) and loss on the
    device, optimiser, the DDP wrapper."""
    sync_bn = env.distributed and env.device.type == "cuda"  # the split was checked by `check_before_start`
    precision = autocast(cfg.run.amp, env.device)
    configure_determinism(cfg)
    from hiposeg.data.dataset import open_prepared
    from hiposeg.models import load_pretrained

    hierarchy, _ = open_prepared(cfg.data.resolved_root(), cfg.data.train_split)
    net, criterion = build_model(cfg, hierarchy, pretrained=False)
    # A new run reports what its pretrained weights gave; a resumed one takes every weight from its checkpoint.
    loaded = load_pretrained(net.segmenter, cfg.model) if fresh and cfg.model.pretrained is not None else None
    if sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # global BN statistics: the batch is global
    net.to(env.device)
    criterion.to(env.device)
    if cfg.run.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.run.amp == "fp16")
    model: Callable[..., Any] = net
    if env.distributed:
        # CPU processes use plain BN (SyncBN needs CUDA); rank 0's BN buffers are broadcast each
        # forward so every rank evaluates the same model. The prototype memory is kept identical
        # by the criterion itself (all-reduced sums and counts).
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            forward_sync_buffers=env.device.type != "cuda")
    if cfg.run.compile:  # the network (with g_phi); the loss terms and prototype memory stay eager
        model = CompiledOrEager(model, "training model", warn=None if env.is_main else lambda msg: None)
    return Training(cfg, env, run_id, hierarchy, net, model, criterion, optimizer, scaler, precision, sync_bn, loaded)


def restore(run: Training, path: Path) -> dict[str, Any]:
    """Continue from the checkpoint at `path`: weights, prototype memory, optimiser and scaler states,
    the iteration and best-so-far. Returns the checkpoint (its RNG state is for `begin`)."""
    ckpt = checkpoint.load(path)
    checkpoint.check_compatible(ckpt, path, run.hierarchy, run.cfg)
    restore_model(ckpt, path, run.net, run.criterion)
    checkpoint.restore_optimizer(ckpt, path, run.optimizer, run.scaler)
    run.iteration, run.best, run.last_eval = int(ckpt["iteration"]), ckpt["best"], ckpt.get("last_eval")
    return ckpt


def begin(run: Training, resume: Path | None, saved: dict[str, Any] | None) -> None:
    """The batch stream from `run.iteration`, then the checkpoint's RNG state (creating the stream
    draws from the RNG), then on rank 0 the run directory's config, log and status."""
    run.batches = iter(train_loader(run.cfg, run.env, run.iteration, run.hierarchy.ignore_index))
    if saved is not None:
        checkpoint.restore(resume, "rng", lambda: checkpoint.set_rng_state(saved["rng"]))  # type: ignore[arg-type]
    if not run.env.is_main:
        return
    rundir.start(run.out, run.cfg, run.iteration, run.run_id)
    run.logger = RunLogger(run.out, run.cfg, run.iteration, fresh=resume is None)
    run.logger.tick(run.iteration, run.criterion.schedule.phase_name(run.iteration))  # the phase it starts in
    if run.pretrained is not None:
        run.logger.print(run.pretrained.line())
    if run.iteration:
        run.logger.print(f"resumed from {resume} at iteration {run.iteration}")


def stop_requested(stop: StopSignal, env: DistEnv) -> bool:
    """A signal arrived (under DDP: on any rank, so that every rank stops at the same iteration)."""
    flag = stop.signum is not None
    return any_rank(flag, env.device) if env.distributed else flag


def step(run: Training, batch: dict[str, Any]) -> None:
    """One optimisation step on one batch (eq. 14 at this iteration's phase); counts the iteration."""
    cfg, env = run.cfg, run.env
    images = batch["image"].to(env.device, non_blocking=True)
    target = batch["fine"].to(env.device, non_blocking=True)
    if cfg.run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    for group in run.optimizer.param_groups:
        group["lr"] = poly_lr(cfg, run.iteration)
    with run.precision:
        out = run.model(images, with_embeddings=run.criterion.needs_embeddings)
    loss, terms = run.criterion(out.logits, out.embeddings, target, run.iteration, aux_logits=out.aux_logits)
    check_finite(run, loss, terms)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.iteration += 1
    run.meter.add({"loss": loss, **terms})


def check_finite(run: Training, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
    """Stop on a NaN/inf loss (on any rank) before it reaches the weights, naming the broken terms."""
    bad = not bool(torch.isfinite(loss.detach()))
    if run.env.distributed:
        bad = any_rank(bad, run.env.device)
    if not bad:
        return
    detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
    broken = [k for k, v in terms.items() if not bool(torch.isfinite(v))]
    where = f" in term{'s' * (len(broken) > 1)} {', '.join(broken)}" if broken else ""
    kept = rundir.checkpoint_path(run.out)
    raise TrainingDiverged(
        f"the loss became non-finite at iteration {run.iteration}{where} ({detail or 'total=' + str(float(loss))})",
        hint=(f"The last good checkpoint is kept: {kept}. " if kept.exists() else "No checkpoint was written yet. ")
        + "Try a lower --lr, --amp bf16 instead of fp16, or check the labels (`hiposeg prepare` manifest).")


def after_step(run: Training) -> None:
    """Log, evaluate and checkpoint on their cadences (the end of training does its own)."""
    cfg, it, total = run.cfg, run.iteration, run.cfg.optim.iters
    phase = run.criterion.schedule.phase_name(it - 1)
    if run.logger:
        run.logger.tick(it, phase)
    if it % cfg.run.log_every == 0 or it == total:
        means = run.meter.means(run.env)
        if run.logger:
            run.logger.step(it, poly_lr(cfg, it - 1), phase, means)
    if cfg.run.eval_every and it % cfg.run.eval_every == 0 and it < total:
        evaluate_now(run)
    if it % cfg.run.ckpt_every == 0 and it < total:
        save(run, "last")


def evaluate_now(run: Training) -> dict[str, Any]:
    """Score the validation split; a better fine mIoU than any before is saved as best.pt."""
    cfg, env = run.cfg, run.env
    if env.distributed and not run.sync_bn:
        broadcast_buffers_(run.net)  # every rank evaluates (and saves) rank 0's BN statistics
    if run.logger:
        run.logger.activity(f"evaluating {cfg.data.val_split}")
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        val = eval_dataset(cfg.data.resolved_root(), cfg.data.val_split, cfg.data.mean, cfg.data.std)
        loader = eval_loader(val, env, batch_size=cfg.run.eval_batch_size, workers=cfg.data.workers)
        report = evaluate(run.net.segmenter, loader, env, mode=cfg.run.eval_mode, crop=cfg.data.crop,
                          amp=cfg.run.amp, iteration=run.iteration)
    run.net.train()
    if run.logger:
        run.logger.activity(None)
    run.last_eval = {k: lv["mIoU"] for k, lv in report["levels"].items()}
    fine = report["levels"]["fine"]["mIoU"]
    improved = fine is not None and (run.best["value"] is None or fine > run.best["value"])
    if improved:
        run.best = {"metric": "fine_mIoU", "value": fine, "iteration": run.iteration}
    if run.logger:
        run.logger.evaluation(run.iteration, report)
    if improved:
        save(run, "best")
    return report


def save(run: Training, name: str) -> None:
    if run.env.is_main:
        ckpt = checkpoint.make_checkpoint(run.cfg, run.hierarchy, run.net, run.criterion, run.optimizer, run.scaler,
                                          iteration=run.iteration, best=run.best, last_eval=run.last_eval,
                                          run_id=run.run_id)
        checkpoint.save(ckpt, rundir.checkpoint_path(run.out, name))


def end(run: Training) -> FitResult:
    """Interrupted: checkpoint (the command that started the run says how to continue). Finished:
    checkpoint, final evaluation, report.json. Then status.json, with every rank's state digest."""
    env, out = run.env, run.out
    interrupted = run.iteration < run.cfg.optim.iters
    report: dict[str, Any] | None = None
    if interrupted:
        if env.distributed and not run.sync_bn:
            broadcast_buffers_(run.net)
        save(run, "last")  # the command that started the run says so, and how to continue (once)
    else:
        save(run, "last")  # the trained weights are safe before the final evaluation can fail
        report = evaluate_now(run)
        save(run, "last")  # again, with the final evaluation's best / last_eval
        if env.is_main:
            atomic_write_json(out / rundir.REPORT_FILE, report)
    digests = rank_digests(run.net, run.criterion)
    if run.logger:
        rundir.write_status(out, "interrupted" if interrupted else "finished", run.iteration, run.run_id,
                            rank_digests=digests)
        if len(set(digests)) > 1:
            run.logger.print(f"warning: the {len(digests)} processes ended with different weights or prototype "
                             f"memory ({digests}); please report this as a bug", style="red")
        run.logger.close()
    return FitResult(out, report, run.iteration, interrupted, is_main=env.is_main)
