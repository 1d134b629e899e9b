"""What a training run tells: `metrics.jsonl` (one JSON object per log step or evaluation),
TensorBoard scalars (with the optional `tensorboard` extra), and progress on the terminal (a Rich
bar on a terminal, plain lines otherwise). Rank 0 only; `TermMeter` averages the logged loss terms
over steps and ranks first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from hiposeg.atomic import open_log
from hiposeg.config import TrainConfig
from hiposeg.distributed import DistEnv
from hiposeg.metrics import summary_line
from hiposeg.rundir import METRICS_FILE, TENSORBOARD_DIR


class TermMeter:
    """The loss terms of the steps since the last log line, summed on the device (no sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.steps += 1

    def means(self, env: DistEnv) -> dict[str, float]:
        """The mean of each term over the steps and ranks, then a fresh start. Under DDP the
        pixel-averaged terms (ce, fh, fl) of one rank are its share of the global mean, so only the
        mean over ranks is the batch's value."""
        keys = list(self.sums)
        vec = torch.stack([torch.as_tensor(self.sums[k], device=env.device).float() for k in keys]) / self.steps
        if env.distributed:
            import torch.distributed as dist

            dist.all_reduce(vec)
            vec /= env.world_size
        self.sums, self.steps = {}, 0
        return dict(zip(keys, vec.tolist()))


class RunLogger:
    """Rank 0 only. Writes `metrics.jsonl` (one JSON object per log step / evaluation)."""

    def __init__(self, out: Path, cfg: TrainConfig, start_iter: int, fresh: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.cfg, self.total = cfg, cfg.optim.iters
        self.console = Console(stderr=True, quiet=cfg.run.quiet)
        # a new run starts its log afresh (a run killed before its first checkpoint is started over);
        # never written through a link, nor into a hard-linked file
        self.metrics = open_log(out / METRICS_FILE, append=not fresh, what="run directory")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / TENSORBOARD_DIR))
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
