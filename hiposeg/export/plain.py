"""The `hiposeg` format (.pt): a plain-data dict, the metadata record plus "state_dict".

Read with `torch.load(weights_only=True)` (`checkpoint.load`), so nothing in it can run code; needs
hiposeg to rebuild the module (`build_segmenter` from its `arch` record), and is the most portable
across torch versions. The same reader takes training checkpoints, which eval and predict accept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hiposeg import checkpoint
from hiposeg.export.common import model_metadata, segmenter_with_weights

NAME, SUFFIX = "hiposeg", ".pt"
# The reload runs the very same module as the reference: exact.
TOLERANCE = 0.0


def write(segmenter: nn.Module, meta: dict[str, Any], out: Path) -> None:
    checkpoint.save({**meta, "state_dict": segmenter.state_dict()}, out)


def model_payload(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The `hiposeg`-format model of a training checkpoint: its segmenter entry only (no head, no memory)."""
    return {**model_metadata(ckpt), "state_dict": ckpt["model"]}


def load(path: Path, device: torch.device) -> tuple[str, dict[str, Any], nn.Module]:
    """("checkpoint" or "hiposeg", metadata, segmenter on `device`) of a training checkpoint or a model."""
    obj = checkpoint.load(path, expect=(checkpoint.CHECKPOINT_FORMAT, checkpoint.MODEL_FORMAT))
    source = "checkpoint" if obj["format"] == checkpoint.CHECKPOINT_FORMAT else NAME
    payload = model_payload(obj) if source == "checkpoint" else obj
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return source, meta, segmenter_with_weights(meta["arch"], payload["state_dict"], path).to(device)


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a model in this format (a UserError for anything else, training checkpoints included)."""
    obj = checkpoint.load(path, expect=(checkpoint.MODEL_FORMAT,))
    return {k: v for k, v in obj.items() if k != "state_dict"}
