"""Helpers shared by the benchmark scripts (run them as scripts: `python benchmarks/NAME.py`)."""

from __future__ import annotations

import torch


def parse_size(text: str) -> tuple[int, int]:
    """"512x1024" -> (512, 1024)."""
    h, _, w = text.lower().replace("×", "x").partition("x")
    return int(h), int(w)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
