"""Confusion matrix -> IoU at every level of the hierarchy.

Semantics follow the official Cityscapes evaluation (cityscapesScripts
`evalPixelLevelSemanticLabeling.py`), which mmsegmentation and torchvision also reproduce:

* one confusion matrix accumulated over the whole split (never averaged per image or batch);
* pixels whose ground truth is ignore are excluded entirely;
* a prediction outside the class range (e.g. 255 from another tool) is kept in an extra "other"
  column: it is a false negative of the true class and a false positive of no class;
* IoU_c = TP / (TP + FP + FN); it is null when the class occurs in neither ground truth nor
  prediction, and mIoU averages the non-null classes;
* the IoU of a coarser level is the IoU after mapping both maps through pi. Because pi maps
  ignore to ignore, that equals summing blocks of the fine matrix, so only the fine matrix is
  accumulated and every other level is derived from it exactly (this is the category IoU of the
  Cityscapes script: confusion inside a category counts as correct).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hiposeg.hierarchy import Hierarchy


class ConfusionMatrix:
    """(K, K+1) int64 counts: rows = ground-truth class, columns = predicted class + "other"."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
        """Add one batch. `pred` and `target` are integer maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
        k = self.num_classes
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        valid = (target != ignore_index) & (target >= 0) & (target < k)
        target, pred = target[valid], pred[valid]
        pred = torch.where((pred >= 0) & (pred < k), pred, torch.full_like(pred, k))
        self.mat += torch.bincount(target * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def numpy(self) -> np.ndarray:
        return self.mat.cpu().numpy()


def map_confusion(mat: np.ndarray, lut: np.ndarray, num_out: int) -> np.ndarray:
    """Confusion of the maps pi(gt), pi(pred) from the fine matrix: sum the blocks of pi."""
    k = mat.shape[0]
    onehot = np.zeros((k, num_out), dtype=np.int64)
    onehot[np.arange(k), lut] = 1
    out = np.zeros((num_out, num_out + 1), dtype=np.int64)
    out[:, :num_out] = onehot.T @ mat[:, :k] @ onehot
    out[:, num_out] = onehot.T @ mat[:, k]
    return out


def iou_per_class(mat: np.ndarray) -> np.ndarray:
    """IoU of each class (float64, NaN where the class is absent from both GT and prediction)."""
    k = mat.shape[0]
    tp = np.diag(mat[:, :k]).astype(np.float64)
    fn = mat.sum(axis=1) - tp  # every predicted column counts, "other" included
    fp = mat[:, :k].sum(axis=0) - tp  # only rows with a non-ignored ground truth exist
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


def level_scores(mat: np.ndarray, names: list[str]) -> dict[str, Any]:
    """The per-level block of report.json: percentages, null for absent classes."""
    iou = iou_per_class(mat)
    total = mat.sum()
    k = mat.shape[0]
    acc = float(np.trace(mat[:, :k]) / total * 100) if total > 0 else None
    valid = ~np.isnan(iou)
    miou = float(iou[valid].mean() * 100) if valid.any() else None
    return {
        "mIoU": miou,
        "pixel_accuracy": acc,
        "IoU": {n: (None if np.isnan(v) else float(v * 100)) for n, v in zip(names, iou)},
        "num_classes": k,
        "pixels": int(total),
    }


def build_report(fine_mat: np.ndarray, hierarchy: Hierarchy, **meta: Any) -> dict[str, Any]:
    """report.json (README "Evaluation"): "fine", "coarse", then every other level above fine by its name."""
    fine = hierarchy.fine_level
    levels: dict[str, Any] = {}
    for level in hierarchy.levels_above_fine:
        if level == fine:
            mat = fine_mat
        else:
            lut = hierarchy.ancestor_lut(fine, level)
            mat = map_confusion(fine_mat, lut, hierarchy.num_classes(level))
        key = "fine" if level == fine else "coarse" if level == hierarchy.coarse_level else level
        levels[key] = {"level": level, **level_scores(mat, hierarchy.names(level))}
    ordered = {k: levels[k] for k in ("fine", "coarse") if k in levels}
    ordered.update({k: v for k, v in levels.items() if k not in ordered})
    return {"levels": ordered, "hierarchy": {"name": hierarchy.name, "sha256": hierarchy.sha256}, **meta}


def summary_line(report: dict[str, Any]) -> str:
    parts = []
    for key, lv in report["levels"].items():
        m = lv["mIoU"]
        parts.append(f"{key} ({lv['level']}) mIoU {m:.2f}" if m is not None else f"{key} mIoU n/a")
    return ", ".join(parts)
