"""A run directory: where `hiposeg train` keeps a run (config.yaml, checkpoints/{last,best}.pt, logs).

Here: how a command given a run directory or a file finds the checkpoint to read.
"""

from __future__ import annotations

import os
from pathlib import Path

from hiposeg.errors import UserError


def resolve_checkpoint(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint file, or a run directory (-> its `checkpoints/{prefer}.pt`, else the other one)."""
    if prefer not in ("best", "last"):
        raise UserError(f"--checkpoint {prefer!r} is not best or last")
    p = Path(path)
    if p.is_dir():
        order = [prefer, "last" if prefer == "best" else "best"]
        for name in order:
            cand = p / "checkpoints" / f"{name}.pt"
            if cand.exists():
                return cand
        raise UserError(f"no checkpoint in run directory {p} (looked for checkpoints/{order[0]}.pt and {order[1]}.pt)",
                        hint="Train first (`hiposeg train --out DIR`) or pass a checkpoint file.")
    if not p.exists():
        raise UserError(f"no such run directory or checkpoint: {p}")
    return p
