"""Sliding-window inference: coverage, equality with whole-image inference, odd sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hiposeg.inference import choose_mode, predict_logits, slide_logits, window_starts


@pytest.mark.parametrize("size,window,stride", [(10, 4, 3), (512, 512, 341), (1024, 512, 341), (700, 512, 341),
                                                (5, 8, 5), (33, 32, 1)])
def test_windows_cover_every_pixel_and_stay_inside(size, window, stride):
    starts = window_starts(size, window, stride)
    covered = torch.zeros(max(size, window), dtype=torch.bool)
    for s in starts:
        assert s >= 0 and (s + window <= size or size <= window)
        covered[s:s + window] = True
    assert covered[:size].all()
    assert starts == sorted(set(starts))


def test_slide_equals_whole_for_a_pointwise_model():
    """A 1x1 conv has no context, so every window sees the same per-pixel logits: the average of
    overlapping windows must equal the whole-image output exactly (up to float rounding)."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 5, 1)
    image = torch.randn(2, 3, 37, 61)
    whole = model(image)
    slid = slide_logits(model, image, 5, crop=(16, 24))
    assert slid.shape == whole.shape
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)
    # images smaller than the window are padded and cropped back
    small = torch.randn(1, 3, 9, 11)
    torch.testing.assert_close(slide_logits(model, small, 5, crop=(16, 24)), model(small), rtol=1e-5, atol=1e-5)


def test_windows_are_averaged_not_summed():
    """A model that outputs its window's mean makes each pixel's result the mean over the windows covering it."""
    class WindowMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3), keepdim=True).expand(x.shape[0], 1, *x.shape[-2:])

    image = torch.zeros(1, 1, 1, 6)
    image[..., :3] = 1.0  # windows of width 4, stride 2: [0:4] mean .75, [2:6] mean .25
    out = slide_logits(WindowMean(), image, 1, crop=(1, 4), stride=(1, 2))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.75, 0.75, 0.5, 0.5, 0.25, 0.25]))


def test_auto_mode_slides_only_larger_images():
    assert choose_mode("auto", (64, 64), (64, 64)) == "whole"
    assert choose_mode("auto", (65, 64), (64, 64)) == "slide"
    assert choose_mode("whole", (1000, 1000), (64, 64)) == "whole"
    calls = []

    def model(x):
        calls.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    predict_logits(model, torch.zeros(1, 3, 100, 50), 2, mode="auto", crop=(64, 64))
    assert calls and all(c == (64, 64) for c in calls)
