"""Progress on a terminal, the same for every command: the bar, `done/total`, the speed and the time left.

Why not Rich's own speed and ETA columns: they estimate the speed from the samples of the last
30 seconds only, so work whose steps are slower than that (a training step of a large model on a
CPU, a full-resolution image in `eval`) showed `-:--:--` for the whole run. `RateEstimate` uses the
work's own average over its last `window` completions instead, and the time left counts down between
them, so it is defined from the first finished step to the end.

`work_progress` is the bar of `prepare`, `eval` and `predict`; the training display (`runlog`) uses
the same estimate and formats.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

UNKNOWN_TIME = "-:--:--"  # before the first completion: no speed to go by


class RateEstimate:
    """Units per second over the last `window` completions (all of them when None), from the clock
    readings at which each count was reached."""

    def __init__(self, start_count: float, window: int | None = None, clock: Callable[[], float] = time.monotonic,
                 start_time: float | None = None) -> None:
        self.clock = clock
        self.samples: deque[tuple[float, float]] = deque(maxlen=None if window is None else window + 1)
        self.samples.append((clock() if start_time is None else start_time, start_count))

    def record(self, count: float) -> None:
        """`count` units are done now (a count equal to the last one adds nothing)."""
        if count != self.samples[-1][1]:
            self.samples.append((self.clock(), count))

    def per_second(self) -> float | None:
        """The average speed over the window; None before the first completion."""
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        if c1 <= c0 or t1 <= t0:
            return None
        return (c1 - c0) / (t1 - t0)

    def seconds_left(self, total: float) -> float | None:
        """Time to `total` at the average speed, counting down since the last completion."""
        speed = self.per_second()
        if speed is None:
            return None
        t_last, done = self.samples[-1]
        return max(0.0, (total - done) / speed - (self.clock() - t_last))


def format_duration(seconds: float | None) -> str:
    """H:MM:SS (days as `Nd H:MM:SS`), or -:--:-- when unknown."""
    if seconds is None:
        return UNKNOWN_TIME
    s = round(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def format_speed(per_second: float | None, unit: str = "it") -> str:
    """`2.35 it/s`, or `12.4 s/it` below one unit per second (easier to read for slow steps)."""
    if per_second is None:
        return f"-- {unit}/s"
    if per_second >= 1:
        return f"{per_second:.2f} {unit}/s"
    return f"{1 / per_second:.1f} s/{unit}"


class SpeedAndTimeLeft(ProgressColumn):
    """`2.35 it/s  ETA 0:01:02` of a Rich task, from a `RateEstimate` of the task's own completions."""

    def __init__(self, unit: str = "it", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.unit, self.clock = unit, clock
        self.rates: dict[TaskID, RateEstimate] = {}

    def render(self, task: Task) -> Text:
        rate = self.rates.get(task.id)
        if rate is None:
            rate = self.rates[task.id] = RateEstimate(task.fields.get("first", 0), clock=self.clock,
                                                      start_time=task.start_time)
        rate.record(task.completed)
        left = None if task.total is None else rate.seconds_left(task.total)
        return Text(f"{format_speed(rate.per_second(), self.unit)}  ETA {format_duration(left)}", no_wrap=True)


class WorkProgress(Progress):
    """A Rich `Progress` whose tasks remember the count they started at (a resumed `prepare` starts
    with its finished files counted), so the speed covers only the work done now."""

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: float = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        fields.setdefault("first", completed)
        return super().add_task(description, start, total, completed, visible, **fields)


def work_progress(*, unit: str = "it", console: Console | None = None, disable: bool = False,
                  transient: bool = False, clock: Callable[[], float] = time.monotonic) -> WorkProgress:
    """The bar of `prepare`, `eval` and `predict` (on stderr: stdout stays for results): label, bar,
    done/total, speed and time left."""
    return WorkProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        SpeedAndTimeLeft(unit, clock), console=console or Console(stderr=True), disable=disable,
                        transient=transient, get_time=clock)
