"""What a training run tells: `metrics.jsonl` (one JSON object per log step or evaluation),
TensorBoard scalars (with the optional `tensorboard` extra), and progress: on a terminal a live
display (`TrainView`: the bar, count, speed and time left on one line, the loss terms below it), plain
lines otherwise. Rank 0 only; `TermMeter` averages the logged loss terms over steps and ranks first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from hiposeg.atomic import open_log
from hiposeg.config import TrainConfig
from hiposeg.distributed import DistEnv
from hiposeg.metrics import summary_line
from hiposeg.progress import RateEstimate, format_duration, format_speed
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


class TrainView:
    """The training display on a terminal, redrawn every second: line 1 is the phase, the bar, the
    iteration count, the speed and the time left, whose widths never change; the loss terms and the
    learning rate follow on their own line(s), wrapped at the terminal's width, so at any width they
    never push line 1 out. Speed and time left are the run's own average over its last `window`
    iterations (`progress.RateEstimate`), defined from the first step whatever its length."""

    def __init__(self, total: int, start_iter: int, *, window: int = 100,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.iteration, self.phase = total, start_iter, ""
        self.rate = RateEstimate(start_iter, window, clock)
        self.terms: dict[str, float] = {}
        self.lr: float | None = None
        self.activity: str | None = None  # e.g. "evaluating" while the bar stands still

    def advance(self, iteration: int, phase: str) -> None:
        self.iteration, self.phase = iteration, phase
        self.rate.record(iteration)

    def status(self) -> tuple[str, str]:
        """(speed, time left) as shown."""
        return format_speed(self.rate.per_second()), format_duration(self.rate.seconds_left(self.total))

    def terms_text(self) -> str:
        lr = "" if self.lr is None else f" lr={self.lr:.2e}"
        return " ".join(f"{k}={v:.3f}" for k, v in self.terms.items()) + lr

    def bar_line(self) -> Table:
        speed, left = self.status()
        label = Text.assemble(("train ", "bold"), self.activity or self.phase)
        grid = Table.grid(padding=(0, 1), expand=True)  # fixed widths: the bar alone gives way
        grid.add_column(no_wrap=True, min_width=len("train 4-align"))
        grid.add_column(ratio=1, no_wrap=True)
        for width in (2 * len(str(self.total)) + 1, len("99.99 it/s"), len("ETA 0:00:00")):
            grid.add_column(no_wrap=True, justify="right", min_width=width)
        grid.add_row(label, ProgressBar(total=self.total, completed=self.iteration, width=None),
                     f"{self.iteration}/{self.total}", speed, f"ETA {left}")
        return grid

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.bar_line()
        if self.terms:
            yield Text(self.terms_text(), style="dim")


class RunLogger:
    """Rank 0 only. Writes `metrics.jsonl` (one JSON object per log step / evaluation), TensorBoard
    scalars, and the progress: a live `TrainView` on a terminal (`tick` every iteration, `step` with
    the loss terms at each log step), one plain line per log step otherwise, nothing when quiet."""

    def __init__(self, out: Path, cfg: TrainConfig, start_iter: int, fresh: bool) -> None:
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
        self.view = TrainView(self.total, start_iter)
        self.live: Live | None = None
        if self.console.is_terminal and not cfg.run.quiet:
            self.live = Live(self.view, console=self.console, refresh_per_second=1)
            self.live.start()
        self._t0, self._i0 = time.perf_counter(), start_iter

    def tick(self, iteration: int, phase: str) -> None:
        """An iteration finished (cheap: no device sync, nothing written)."""
        self.view.advance(iteration, phase)

    def activity(self, what: str | None) -> None:
        """Say what the run is doing while the bar stands still (None: training again)."""
        self.view.activity = what

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
        self.view.advance(iteration, phase)
        self.view.terms, self.view.lr = terms, lr
        if self.live is not None:
            self.live.refresh()  # the new loss terms now, not at the next of the once-a-second redraws
        elif not self.cfg.run.quiet:
            shown_speed, left = self.view.status()
            self.print(f"iter {iteration}/{self.total}  {shown_speed}  ETA {left}  [{phase}]  {self.view.terms_text()}")

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
        if not self.cfg.run.quiet:  # off a terminal one line each, unwrapped (logs are read with grep)
            self.console.print(Text(msg, style=style or ""), highlight=False, soft_wrap=self.live is None)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
