"""Inference-only models: what `export` writes and what `eval` / `predict` load.

An exported model is the DeepLabV3+ segmenter alone: the projection head g_phi and the prototype
memory live in the training wrapper and the criterion, so they are simply not part of it. The
default format is a plain-data dict (loadable with `torch.load(weights_only=True)`):

    format "hiposeg-model/1", hiposeg_version, arch {backbone, output_stride, num_classes},
    state_dict, hierarchy (normalised dict), classes/colors of the fine and coarse levels,
    fine_to_coarse, normalization {mean, std}, crop (training crop, for sliding windows),
    data (prepared dataset the model was trained on), trained {iteration, best}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hiposeg import __version__, checkpoint
from hiposeg.config import TrainConfig
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy


@dataclass
class InferenceModel:
    """A callable segmenter (normalised image batch -> fine logits) plus what is needed to use it."""

    module: nn.Module
    hierarchy: Hierarchy
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: tuple[int, int]
    data_root: Path | None
    source: str


def segmenter_from_arch(arch: dict[str, Any]) -> nn.Module:
    from hiposeg.model import DeepLabV3Plus

    return DeepLabV3Plus(arch["num_classes"], backbone=arch["backbone"], output_stride=arch["output_stride"])


def model_payload(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The plain-data exported model built from a training checkpoint (no head, no memory)."""
    cfg = TrainConfig.model_validate(ckpt["config"])
    h = Hierarchy.from_dict(ckpt["hierarchy"])
    return {
        "format": checkpoint.MODEL_FORMAT,
        "hiposeg_version": __version__,
        "arch": {"name": "deeplabv3plus", "backbone": cfg.model.backbone, "output_stride": cfg.model.output_stride,
                 "num_classes": h.num_fine},
        "state_dict": ckpt["model"],
        "hierarchy": h.to_dict(),
        "classes": {"fine": h.names(h.fine_level), "coarse": h.names(h.coarse_level)},
        "colors": {"fine": h.colors(h.fine_level).tolist(), "coarse": h.colors(h.coarse_level).tolist()},
        "fine_to_coarse": h.fine_to_coarse.tolist(),
        "normalization": {"mean": list(cfg.data.mean), "std": list(cfg.data.std)},
        "crop": list(cfg.data.crop),
        "data": str(cfg.data.resolved_root()),
        "trained": {"iteration": ckpt["iteration"], "best": ckpt.get("best")},
    }


def load_inference_model(path: str | Path, prefer: str = "best") -> InferenceModel:
    """A run directory, a training checkpoint, or an exported `hiposeg-model/1` file."""
    p = checkpoint.resolve(path, prefer=prefer)
    obj = checkpoint.load(p, expect=(checkpoint.CHECKPOINT_FORMAT, checkpoint.MODEL_FORMAT))
    payload = model_payload(obj) if obj["format"] == checkpoint.CHECKPOINT_FORMAT else obj
    h = Hierarchy.from_dict(payload["hierarchy"])
    module = segmenter_from_arch(payload["arch"])
    try:
        module.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{p} does not match its recorded architecture {payload['arch']}: {str(e)[:300]}") from None
    module.eval()
    norm = payload["normalization"]
    return InferenceModel(module, h, tuple(norm["mean"]), tuple(norm["std"]), tuple(payload["crop"]),
                          Path(payload["data"]) if payload.get("data") else None, source=obj["format"])
