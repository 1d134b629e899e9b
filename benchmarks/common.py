"""Helpers shared by the benchmark scripts (run them as scripts: `python benchmarks/NAME.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def parse_size(text: str) -> tuple[int, int]:
    """"512x1024" -> (512, 1024)."""
    h, _, w = text.lower().replace("×", "x").partition("x")
    return int(h), int(w)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(runs: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                warmup: int, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per call of each of `runs`, called in turn (A, B, C, A, B, C, ...) after `warmup`
    rounds, so drift in clock speed or in the neighbours' load hits every contender alike.
    `clock="cpu"`: this process's CPU time instead of wall time, which other processes on a
    shared machine barely disturb (with one torch thread it is the work done; CPU only)."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync(device)
            t0 = now()
            run()
            sync(device)
            times[name].append(now() - t0)
    return times


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def min_ms(times: list[float]) -> float:
    return 1e3 * min(times)
