"""Helpers shared by the benchmark scripts (run them as scripts: `python benchmarks/NAME.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch


def parse_size(text: str) -> tuple[int, int]:
    """"512x1024" -> (512, 1024)."""
    h, _, w = text.lower().replace("×", "x").partition("x")
    return int(h), int(w)


def models_of(models: list[str] | None, backbones: list[str]) -> list[tuple[str, str]]:
    """`--models FAMILY:VARIANT ...` as (family, variant) pairs; without it, DeepLabV3+ on `--backbones`."""
    if not models:
        return [("deeplabv3plus", b) for b in backbones]
    pairs = [m.partition(":")[::2] for m in models]
    return [(family, variant or None) for family, variant in pairs]


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


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """The `--amp off|bf16|fp16` mixed-precision context."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def random_batch(batch: int, size: tuple[int, int], classes: int, ignore: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random image batch and label maps of 16x16 cells with 5 % `ignore` pixels."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *size, generator=gen)
    cells = torch.randint(classes, (batch, size[0] // 16 + 1, size[1] // 16 + 1), generator=gen)
    y = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, : size[0], : size[1]].contiguous()
    y[torch.rand(y.shape, generator=gen) < 0.05] = ignore
    return x.to(device), y.to(device)
