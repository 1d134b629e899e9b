"""Helpers shared by the benchmark scripts (run them as scripts: `python benchmarks/NAME.py`)."""

from __future__ import annotations

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
