"""Scoring a segmenter (or another tool's label maps) on a prepared split: `hiposeg eval`, the
periodic evaluations of training and its final report.

    eval_dataset -> eval_loader    the split at the labels' full resolution; under DDP each rank
                                   takes every world_size-th image (no padding duplicates)
    evaluate                       fine logits -> argmax -> one confusion matrix, summed over the
                                   ranks before any IoU is computed (`metrics.build_report`)
    evaluate_predictions           the same report from `{stem}.png` files of fine ids
    autocast                       the one mixed-precision decision, for training and evaluation

Nothing here knows the training branch (projection head, prototypes): any module mapping a
normalised image batch to fine logits is scored the same way.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from hiposeg.distributed import DistEnv
from hiposeg.errors import UserError
from hiposeg.inference import predict_logits
from hiposeg.metrics import ConfusionMatrix, build_report

if TYPE_CHECKING:
    from hiposeg.data.dataset import PreparedDataset


def autocast(amp: str, device: torch.device) -> AbstractContextManager:
    """Mixed precision for `--amp off | bf16 | fp16` on `device`, the same for training and evaluation:
    fp16 needs a CUDA GPU, and asking for it on the CPU is an error rather than silently full precision."""
    if amp == "off":
        return nullcontext()
    if amp == "fp16" and device.type == "cpu":
        raise UserError("--amp fp16 needs a CUDA GPU", hint="Use --amp bf16 on the CPU, or --amp off.")
    return torch.autocast(device_type=device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def eval_dataset(data_root: Path, split: str, mean: tuple[float, float, float],
                 std: tuple[float, float, float]) -> PreparedDataset:
    """A prepared split as evaluation reads it: normalised full-resolution images and fine labels."""
    from hiposeg.data.dataset import PreparedDataset
    from hiposeg.data.transforms import eval_transforms

    return PreparedDataset(data_root, split, transforms=eval_transforms(mean, std), levels=("fine",))


def eval_loader(dataset: PreparedDataset, env: DistEnv, *, batch_size: int = 1, workers: int = 2) -> DataLoader:
    """This rank's share of `dataset` (an `eval_dataset`), in order: every world_size-th image."""
    return DataLoader(dataset, batch_size=batch_size, sampler=range(env.rank, len(dataset), env.world_size),
                      num_workers=workers, pin_memory=env.device.type == "cuda")


@torch.no_grad()
def evaluate(segmenter: nn.Module, loader: DataLoader, env: DistEnv, *, mode: str = "auto",
             crop: tuple[int, int] = (512, 1024), amp: str = "off", iteration: int | None = None,
             save_predictions: Path | None = None, progress: bool = False, invalid_gt: str = "error") -> dict[str, Any]:
    """IoU at every level over the split of `loader` (an `eval_loader`), at the labels' full resolution.

    `mode` and `crop` choose whole-image or sliding-window inference (`inference.predict_logits`).
    Ground-truth values that are neither a class nor ignore stop the evaluation (`invalid_gt="error"`:
    at the first such batch in one process, after the split under DDP so every rank stops together)
    or are counted and reported (`"ignore"`).
    """
    dataset = loader.dataset
    h = dataset.hierarchy
    gt_dir = dataset.root / dataset.split / "fine"
    precision = autocast(amp, env.device)
    was_training = segmenter.training
    segmenter.eval()
    cm = ConfusionMatrix(h.num_fine, env.device)
    bar = _eval_progress(progress and env.is_main, len(loader.sampler))
    try:
        for batch in loader:
            images = batch["image"].to(env.device, non_blocking=True)
            target = batch["fine"].to(env.device, non_blocking=True)
            with precision:
                logits = predict_logits(segmenter, images, h.num_fine, mode=mode, crop=crop)  # type: ignore[arg-type]
            pred = logits.argmax(1)
            cm.update(pred, target, h.ignore_index, files=[str(gt_dir / f"{s}.png") for s in batch["stem"]])
            if not env.distributed and cm.invalid:
                cm.check_ground_truth(invalid_gt, h.ignore_index)  # "error": stop at the first such file
            if save_predictions is not None:
                _save_predictions(save_predictions, batch["stem"], pred, h.label_dtype)
            if bar:
                bar[0].advance(bar[1], len(images))
    finally:
        if bar:
            bar[0].stop()
    cm.all_reduce()
    if was_training:
        segmenter.train()
    meta: dict[str, Any] = {"split": dataset.split, "data": str(dataset.root), "images": len(dataset), "mode": mode}
    if iteration is not None:
        meta["iteration"] = iteration
    return build_report(cm.numpy(), h, **meta, **ground_truth_note(cm, invalid_gt, h.ignore_index))


def ground_truth_note(cm: ConfusionMatrix, invalid_gt: str, ignore_index: int) -> dict[str, Any]:
    """report.json's "invalid_ground_truth" entry (policy "ignore"), {} when the ground truth is valid;
    raises `InvalidGroundTruth` under policy "error"."""
    invalid = cm.check_ground_truth(invalid_gt, ignore_index)
    return {} if invalid is None else {"invalid_ground_truth": invalid}


def _save_predictions(folder: Path, stems: list[str], pred: torch.Tensor, dtype: Any) -> None:
    """Write a batch's fine-id maps as `{stem}.png`; a failed write is one clear error."""
    from hiposeg.atomic import name_too_long_fix, write_failure
    from hiposeg.data.dataset import write_label

    for stem, p in zip(stems, pred.cpu().numpy()):
        path = folder / f"{stem}.png"
        try:
            write_label(path, p.astype(dtype))
        except OSError as e:
            raise UserError(f"could not write prediction {write_failure(e, path)}",
                            hint=name_too_long_fix(e) or "Free disk space or choose another --save-predictions "
                                                         "folder.") from None


def _eval_progress(enabled: bool, total: int):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from hiposeg.progress import work_progress

    p = work_progress(unit="img", transient=True)
    task = p.add_task("eval", total=total)
    p.start()
    return p, task


def evaluate_predictions(pred_dir: Path, data_root: Path, split: str, *, invalid_gt: str = "error") -> dict[str, Any]:
    """Score label PNGs from any tool (`{stem}.png`, fine ids) against a prepared split."""
    from hiposeg.data.dataset import PreparedDataset, read_label

    ds = PreparedDataset(data_root, split, transforms=None, levels=("fine",))
    h = ds.hierarchy
    cm = ConfusionMatrix(h.num_fine)
    missing = [s for s in ds.stems if not (pred_dir / f"{s}.png").exists()]
    if missing:
        raise UserError(f"{len(missing)} of {len(ds.stems)} predictions are missing in {pred_dir}, "
                        f"e.g. {missing[0]}.png",
                        hint="Predictions must be named {stem}.png (one per image of the split), holding fine class ids.")
    gt_dir = Path(data_root) / split / "fine"
    for stem in ds.stems:
        gt = read_label(gt_dir / f"{stem}.png")
        pred = read_label(pred_dir / f"{stem}.png")
        if pred.ndim != 2:
            raise UserError(f"prediction {pred_dir / (stem + '.png')} has {pred.shape[2]} channels; expected a "
                            "single-channel map of fine class ids")
        if pred.shape != gt.shape:
            raise UserError(f"prediction {pred_dir / (stem + '.png')} is {pred.shape[1]}x{pred.shape[0]} but the "
                            f"label is {gt.shape[1]}x{gt.shape[0]}",
                            hint="Predictions must be at the label's full resolution.")
        cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)), h.ignore_index,
                  files=[str(gt_dir / f"{stem}.png")])
        if cm.invalid:
            cm.check_ground_truth(invalid_gt, h.ignore_index)  # "error": stop at the first such file
    return build_report(cm.numpy(), h, split=split, data=str(data_root), images=len(ds.stems),
                        predictions=str(pred_dir), **ground_truth_note(cm, invalid_gt, h.ignore_index))
