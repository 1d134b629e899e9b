"""Confusion matrix -> IoU at every level of the hierarchy.

Semantics follow the official Cityscapes evaluation (cityscapesScripts
`evalPixelLevelSemanticLabeling.py`), which mmsegmentation and torchvision also reproduce:

* one confusion matrix accumulated over the whole split (never averaged per image or batch);
* pixels whose ground truth is ignore are excluded entirely;
* a prediction outside the class range (e.g. 255 from another tool) is kept in an extra "other"
  column: it is a false negative of the true class and a false positive of no class;
* IoU_c = TP / (TP + FP + FN); it is null when the class occurs in neither ground truth nor
  prediction, and mIoU averages the non-null classes;
* a ground-truth value that is neither a class nor ignore is never dropped in silence: it is an
  error naming the file, the values and their pixel counts (`InvalidGroundTruth`), or, with the
  "ignore" policy (`hiposeg eval --invalid-gt ignore`), left out of every score and reported in
  report.json under "invalid_ground_truth";
* the IoU of a coarser level is the IoU after mapping both maps through pi. Because pi maps
  ignore to ignore, that equals summing blocks of the fine matrix, so only the fine matrix is
  accumulated and every other level is derived from it exactly (this is the category IoU of the
  Cityscapes script: confusion inside a category counts as correct).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy

INVALID_GT_POLICIES = ("error", "ignore")


class InvalidGroundTruth(UserError):
    """Ground truth holds values that are neither a class nor the ignore value."""


def describe_values(counts: dict[int, int], limit: int = 6) -> str:
    """`200 (2,048 px), 17 (10 px)`: label values with their pixel counts, most frequent first."""
    top = sorted(counts.items(), key=lambda vc: (-vc[1], vc[0]))
    text = ", ".join(f"{v} ({c:,} px)" for v, c in top[:limit])
    return text + (f" and {len(top) - limit} more value(s)" if len(top) > limit else "")


class ConfusionMatrix:
    """(K, K+1) int64 counts: rows = ground-truth class, columns = predicted class + "other".

    Ground-truth values outside the classes (other than ignore) are left out of the counts and
    recorded per file in `invalid` ({file: {value: pixels}}) for `check_ground_truth`."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)
        self.invalid: dict[str, dict[int, int]] = {}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, ignore_index: int,
               files: Sequence[str] | None = None) -> None:
        """Add one batch. `pred` and `target` are integer maps of the same shape; `files` names the
        ground truth of each image of the batch (for the invalid-value record)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
        k = self.num_classes
        target = target.to(self.mat.device, torch.int64)
        invalid = (target != ignore_index) & ((target < 0) | (target >= k))
        if bool(invalid.any()):  # one device sync per batch; the masked selection below syncs anyway
            self._record_invalid(target, invalid, files)
        target = target.reshape(-1)
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        valid = (target != ignore_index) & ~invalid.reshape(-1)
        target, pred = target[valid], pred[valid]
        pred = torch.where((pred >= 0) & (pred < k), pred, torch.full_like(pred, k))
        self.mat += torch.bincount(target * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)

    def _record_invalid(self, target: torch.Tensor, invalid: torch.Tensor, files: Sequence[str] | None) -> None:
        if files is not None and target.dim() == 3 and len(files) == target.shape[0]:
            images = zip(files, target, invalid)
        else:  # a single map, or no names given
            images = zip([files[0] if files and len(files) == 1 else "(unnamed ground truth)"], [target], [invalid])
        for name, t, bad in images:
            if not bool(bad.any()):
                continue
            values, counts = torch.unique(t[bad], return_counts=True)
            record = self.invalid.setdefault(str(name), {})
            for v, c in zip(values.tolist(), counts.tolist()):
                record[v] = record.get(v, 0) + c

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)
            flag = torch.tensor([len(self.invalid)], device=self.mat.device)
            dist.all_reduce(flag)
            if int(flag.item()):  # rare: gather every rank's record (all ranks agree to take this branch)
                records: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(records, self.invalid)
                self.invalid = {f: r for rec in records for f, r in rec.items()}

    def invalid_summary(self) -> dict[str, Any] | None:
        """report.json's "invalid_ground_truth": pixels in all, per value, per file; None if none."""
        if not self.invalid:
            return None
        values: dict[int, int] = {}
        for record in self.invalid.values():
            for v, c in record.items():
                values[v] = values.get(v, 0) + c
        return {"pixels": sum(values.values()),
                "values": {str(v): c for v, c in sorted(values.items())},
                "files": {f: {str(v): c for v, c in sorted(r.items())} for f, r in sorted(self.invalid.items())}}

    def check_ground_truth(self, policy: str, ignore_index: int) -> dict[str, Any] | None:
        """Raise `InvalidGroundTruth` naming the files, values and counts ("error"), or return the
        summary for the report ("ignore"). No invalid value: None."""
        if policy not in INVALID_GT_POLICIES:
            raise UserError(f"--invalid-gt {policy!r} is not one of {', '.join(INVALID_GT_POLICIES)}")
        summary = self.invalid_summary()
        if summary is None or policy == "ignore":
            return summary
        files = sorted(self.invalid.items())
        shown = "; ".join(f"{f}: {describe_values(r)}" for f, r in files[:5])
        more = f"; and {len(files) - 5} more file(s)" if len(files) > 5 else ""
        raise InvalidGroundTruth(
            f"ground truth holds values that are neither a class (0..{self.num_classes - 1}) nor the ignore value "
            f"{ignore_index} ({summary['pixels']:,} pixels in {len(files)} file(s)): {shown}{more}",
            hint="Restore the label maps (prepare the dataset again with --overwrite), or evaluate with "
                 "`hiposeg eval --invalid-gt ignore` to leave those pixels out and count them in the report.")

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
    """report.json (README "Evaluation"): "fine", "coarse", then every other level above fine by its name.
    Each level carries its confusion matrix ("confusion": rows = ground truth, columns = prediction, then
    "other"), so pictures need no second evaluation; reports written before it have none."""
    fine = hierarchy.fine_level
    levels: dict[str, Any] = {}
    for level in hierarchy.levels_above_fine:
        if level == fine:
            mat = fine_mat
        else:
            lut = hierarchy.ancestor_lut(fine, level)
            mat = map_confusion(fine_mat, lut, hierarchy.num_classes(level))
        key = "fine" if level == fine else "coarse" if level == hierarchy.coarse_level else level
        levels[key] = {"level": level, **level_scores(mat, hierarchy.names(level)), "confusion": mat.tolist()}
    ordered = {k: levels[k] for k in ("fine", "coarse") if k in levels}
    ordered.update({k: v for k, v in levels.items() if k not in ordered})
    return {"levels": ordered, "hierarchy": {"name": hierarchy.name, "sha256": hierarchy.sha256}, **meta}


def summary_line(report: dict[str, Any]) -> str:
    parts = []
    for key, lv in report["levels"].items():
        m = lv["mIoU"]
        parts.append(f"{key} ({lv['level']}) mIoU {m:.2f}" if m is not None else f"{key} mIoU n/a")
    return ", ".join(parts)
