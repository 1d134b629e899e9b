"""Whole-image and sliding-window inference, shared by `eval`, the end of training and `predict`.

Sliding windows follow mmsegmentation's `slide_inference`: windows of the training crop size laid
out with a fixed stride, the last window in each direction aligned to the image border, logits of
overlapping windows averaged. Images smaller than a window are padded (and the padding cropped
off again), so any image size works with any model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from hiposeg.errors import UserError

Mode = Literal["auto", "whole", "slide"]


def choose_mode(mode: Mode, image_hw: tuple[int, int], crop: tuple[int, int]) -> Literal["whole", "slide"]:
    """`auto`: slide only when the image is larger than the training crop in some direction."""
    if mode != "auto":
        return mode
    return "slide" if image_hw[0] > crop[0] or image_hw[1] > crop[1] else "whole"


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, size); the last one ends exactly at `size`."""
    if size <= window:
        return [0]
    n = (size - window + stride - 1) // stride + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


def model_input_size(mode: Mode, image_hw: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) the model itself is given for an image: the image, or in slide mode the windows of
    the crop (a smaller image is padded up to it)."""
    return tuple(image_hw) if choose_mode(mode, image_hw, crop) == "whole" else tuple(crop)  # type: ignore[return-value]


def check_input_sizes(model: object, images: Sequence[tuple[Path, tuple[int, int]]], mode: Mode,
                      crop: tuple[int, int], batch_size: int) -> None:
    """Before any output is written: every image ((file, (H, W)), in batches of up to `batch_size`)
    within the input limits of `model`, if it has any (an exported program's `check_size`); the first
    that is not is a UserError naming the file."""
    check = getattr(model, "check_size", None)
    if check is None:
        return
    for path, hw in images:
        h, w = model_input_size(mode, hw, crop)
        try:
            check(min(batch_size, len(images)), h, w)
        except UserError as e:
            raise UserError(f"image {path} ({hw[1]}x{hw[0]} pixels, {mode} mode): {e.message}", hint=e.hint) from None


@torch.no_grad()
def slide_logits(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, num_classes: int,
                 crop: tuple[int, int], stride: tuple[int, int] | None = None) -> torch.Tensor:
    """Average the logits of overlapping crop-sized windows over `image` (B, 3, H, W)."""
    b, _, h, w = image.shape
    ch, cw = crop
    sh, sw = stride or (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
    H, W = image.shape[-2:]
    out = torch.zeros(b, num_classes, H, W, device=image.device, dtype=torch.float32)
    count = torch.zeros(1, 1, H, W, device=image.device, dtype=torch.float32)
    for y in window_starts(H, ch, sh):
        for x in window_starts(W, cw, sw):
            out[:, :, y:y + ch, x:x + cw] += model(image[:, :, y:y + ch, x:x + cw]).float()
            count[:, :, y:y + ch, x:x + cw] += 1
    return (out / count)[:, :, :h, :w]


@torch.no_grad()
def predict_logits(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, num_classes: int,
                   mode: Mode = "auto", crop: tuple[int, int] = (512, 1024)) -> torch.Tensor:
    """Logits (B, K, H, W) for a normalised image batch at its own resolution."""
    chosen = choose_mode(mode, tuple(image.shape[-2:]), crop)
    if chosen == "whole":
        return model(image).float()
    return slide_logits(model, image, num_classes, crop)
