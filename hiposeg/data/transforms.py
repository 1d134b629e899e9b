"""Train / eval presets on `torchvision.transforms.v2`.

A sample is a dict `{"image": tv_tensors.Image uint8 (3,H,W), "fine": tv_tensors.Mask,
"coarse": tv_tensors.Mask, "stem": str}` (label maps present as requested). Because the label
maps are `Mask`s, every geometric op moves them with the image and uses nearest interpolation;
padding fills them with the ignore index. Images stay uint8 until the last two steps
(`ToDtype` float + `Normalize`); masks become int64.

Train: random scale in `scale_range` + random crop with ignore padding (`RandomScaleCrop`, fused
so only the cropped region is resized), horizontal flip, brightness/contrast/saturation jitter.
Eval: no geometric change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class RandomScaleCrop(v2.Transform):
    """Random rescale by s ~ U(scale_range), then a random `crop` window, padded where the scaled
    image is smaller (image with 0, masks with `ignore_index`).

    Same result as `RandomResize` by a factor followed by `RandomCrop(pad_if_needed=True)`, but the
    window is chosen first and only the source region it covers is resized: a 2x zoom of a
    1024x2048 frame resizes a 256x512 region instead of the whole 2048x4096 image.
    """

    def __init__(self, crop: tuple[int, int], scale_range: tuple[float, float], ignore_index: int) -> None:
        super().__init__()
        self.crop = (int(crop[0]), int(crop[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        sizes = {tuple(x.shape[-2:]) for x in flat_inputs if isinstance(x, (tv_tensors.Image, tv_tensors.Mask))}
        if len(sizes) != 1:
            raise ValueError(f"image and label maps differ in size: {sorted(sizes)}")
        (h, w), (ch, cw) = sizes.pop(), self.crop
        s = float(torch.empty(1).uniform_(*self.scale_range))
        # the crop window in source pixels (the effective scale is ch/sh, within rounding of s)
        sh, sw = max(1, round(ch / s)), max(1, round(cw / s))
        top = int(torch.randint(0, h - sh + 1, ()).item()) if h >= sh else -int(torch.randint(0, sh - h + 1, ()).item())
        left = int(torch.randint(0, w - sw + 1, ()).item()) if w >= sw else -int(torch.randint(0, sw - w + 1, ()).item())
        # the part of the window inside the image, and where it lands in the output
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + sh, h), min(left + sw, w)
        fy, fx = ch / sh, cw / sw
        oy0, ox0 = round((y0 - top) * fy), round((x0 - left) * fx)
        oy1, ox1 = max(oy0 + 1, min(ch, round((y1 - top) * fy))), max(ox0 + 1, min(cw, round((x1 - left) * fx)))
        return {"box": (y0, x0, y1 - y0, x1 - x0), "out": (oy1 - oy0, ox1 - ox0),
                "pad": [ox0, oy0, cw - ox1, ch - oy1]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        y, x, hh, ww = params["box"]
        out = F.crop(inpt, y, x, hh, ww)
        if params["out"] != (hh, ww):
            # NEAREST_EXACT samples masks at the same half-pixel centres bilinear uses for the image
            mode = v2.InterpolationMode.NEAREST_EXACT if isinstance(inpt, tv_tensors.Mask) else v2.InterpolationMode.BILINEAR
            out = F.resize(out, list(params["out"]), interpolation=mode, antialias=True)
        if any(params["pad"]):
            fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0
            out = F.pad(out, params["pad"], fill=fill)
        return out


def _finish(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def train_transforms(crop: tuple[int, int], scale_range: tuple[float, float], hflip: bool, color_jitter: float,
                     mean: Sequence[float], std: Sequence[float], ignore_index: int) -> Callable[[dict], dict]:
    """Random scale + crop (ignore padding), flip, photometric jitter, then float + normalise."""
    steps: list[v2.Transform] = [RandomScaleCrop(crop, scale_range, ignore_index)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return v2.Compose(steps + _finish(mean, std))


def eval_transforms(mean: Sequence[float], std: Sequence[float]) -> Callable[[dict], dict]:
    """Full-resolution images and labels: only float conversion and normalisation."""
    return v2.Compose(_finish(mean, std))

