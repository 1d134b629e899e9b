"""DeepLabV3+ (Chen et al., ECCV 2018) on a torchvision ResNet: the paper's segmenter, as its paper defines it.

Backbone, ASPP with atrous *separable* convolutions, a stride-4 decoder of separable 3x3 convolutions
over the upsampled ASPP output and the 48-channel projection of the stage-1 feature, a classifier
over the FINE classes. It is the only thing that is ever exported; the projection head and the
optional auxiliary head live in the training wrapper (`models/training.py`).

Every separable convolution is depthwise 3x3 -> pointwise 1x1 -> BN -> ReLU, the ordering of
segmentation_models_pytorch (the library a user would pick instead) and of Xception's separable
convolution (Chollet 2017, whose ablation found no non-linearity between the two convolutions
better). The paper prescribes BN + ReLU after each depthwise convolution for its modified Xception
backbone, and the authors' TensorFlow code (`split_separable_conv2d`) and mmsegmentation's
`DepthwiseSeparableConvModule` use that ordering in the ASPP and decoder too. We chose the first
because it does less work for the same filters: the second adds a BN and a ReLU over every
separable convolution's full-width input (13,408 more parameters at ResNet-50 and two more passes
over the largest ASPP and decoder tensors) to a step that has to match SMP's. Its effect on
accuracy is not measured (no real-data runs here).

Earlier hiposeg versions built torchvision's plain ASPP and plain 3x3 decoder convolutions (40.4 M
parameters at ResNet-50 instead of 26.6 M, 1.4x the training step). Nobody needs that variant (it is
not the paper's baseline and costs more), so it was removed: its weights are recognised and refused
with the fix (`refuse_plain_head`), and every exported `arch` record names its head (`HEAD`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiposeg.config import ModelConfig
from hiposeg.errors import UserError
from hiposeg.models.resnet import ResNetBackbone
from hiposeg.models.segmenter import Family, Segmenter, init_new_layers

ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}  # DeepLabV3+ paper: rates double when the stride halves
LOW_LEVEL_CHANNELS = 48  # the paper's projection of the stage-1 feature (Table 1)
ASPP_DROPOUT = 0.1  # the authors' code: dropout with keep probability 0.9 after the ASPP projection
HEAD = "separable"  # what the exported `arch` record says this module's ASPP and decoder are
PLAIN_HEAD_KEY = "fuse.0.0.weight"  # the first plain 3x3 decoder conv of earlier versions; no separable model has it

# The operators of every DeepLabV3+ program hiposeg exports (ResNet-18/50/101, output stride 8 and 16), and
# of those the earlier plain model exported (`relu.default`), which still run. Depthwise convolutions are
# `aten.conv2d` with groups = channels; the image-pooling branch is broadcast with `aten.expand`.
PROGRAM_OPS = frozenset({
    "torch.ops.aten.conv2d.default", "torch.ops.aten.batch_norm.default", "torch.ops.aten.relu.default",
    "torch.ops.aten.relu_.default", "torch.ops.aten.add_.Tensor", "torch.ops.aten.max_pool2d.default",
    "torch.ops.aten.adaptive_avg_pool2d.default", "torch.ops.aten.dropout.default", "torch.ops.aten.cat.default",
    "torch.ops.aten.expand.default", "torch.ops.aten.upsample_bilinear2d.vec", "torch.ops.aten.sym_size.int",
    "_operator.add", "_operator.floordiv",
})


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SeparableConv(nn.Sequential):
    """Atrous separable 3x3 convolution (paper Sec. 3.1, Fig. 3): depthwise 3x3 at `dilation` -> pointwise
    1x1 -> BN -> ReLU (no BN or ReLU between the two convolutions; see the module docstring)."""

    def __init__(self, cin: int, cout: int, dilation: int = 1) -> None:
        super().__init__(OrderedDict([
            ("depthwise", nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False)),
            ("pointwise", nn.Conv2d(cin, cout, 1, bias=False)),
            ("bn", nn.BatchNorm2d(cout)), ("relu", nn.ReLU(inplace=True)),
        ]))


class SeparableASPP(nn.Module):
    """Atrous spatial pyramid pooling with separable atrous branches (paper Sec. 3.1): a 1x1 conv, three
    separable 3x3 convs at `rates`, image-level pooling (global average -> 1x1 conv, broadcast back),
    concatenated and projected by a 1x1 conv to `channels`, then dropout."""

    def __init__(self, cin: int, rates: tuple[int, ...], channels: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, channels, 1), *(SeparableConv(cin, channels, r) for r in rates)])
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, channels, 1))
        self.project = nn.Sequential(conv_bn_relu((len(rates) + 2) * channels, channels, 1), nn.Dropout(ASPP_DROPOUT))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pooling(x).expand(-1, -1, *x.shape[-2:])  # = bilinear upsampling of a 1x1 map, without its cost
        return self.project(torch.cat([*(branch(x) for branch in self.branches), pooled], dim=1))


class DeepLabV3Plus(Segmenter):
    """torchvision ResNet-18/50/101 backbone, output stride 8 (dilated layer3+4) or 16 (dilated layer4);
    separable ASPP (rates 12/24/36 at OS8, 6/12/18 at OS16) of `decoder_channels`; the stage-1 (layer1)
    feature reduced to 48 ch by a 1x1 conv, concatenated with the upsampled ASPP output and fused by two
    separable 3x3 convs of `decoder_channels` at stride 4; a 1x1 classifier over the FINE classes; logits
    upsampled (bilinear, align_corners=False) to the input.

    The forward path has no data-dependent control flow, so `torch.export` with dynamic H and W works.
    Note: ASPP's image-pooling branch has a BatchNorm over a 1x1 map, so training needs >= 2 images per
    BatchNorm (per process without SyncBatchNorm), as in torchvision's DeepLabV3.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 8,
                 decoder_channels: int = 256) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.output_stride = output_stride
        self.backbone = ResNetBackbone(backbone, output_stride)
        self.decoder_channels = decoder_channels
        self.backbone_channels = self.backbone.out_channels
        self.aux_channels = self.backbone.stage3_channels
        self.aspp = SeparableASPP(self.backbone.out_channels, ASPP_RATES[output_stride], decoder_channels)
        self.reduce_low_level = conv_bn_relu(self.backbone.low_level_channels, LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(SeparableConv(decoder_channels + LOW_LEVEL_CHANNELS, decoder_channels),
                                  SeparableConv(decoder_channels, decoder_channels))
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        for module in (self.aspp, self.reduce_low_level, self.fuse):
            init_new_layers(module)
        # Small classifier init (mmsegmentation's conv_seg: N(0, 0.01)): the first losses are ~ln K
        # instead of the large values He init gives a layer followed by no nonlinearity.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """{"logits": (B, K, H, W), "decoder": (B, decoder_channels, H/4, W/4), "backbone": stage-4 feature
        (B, C, H/OS, W/OS), "aux": stage-3 feature (B, C3, H/16 or H/8, ...)}."""
        low, stage3, high = self.backbone(x)
        context = self.aspp(high)
        low = self.reduce_low_level(low)
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=False)
        decoder = self.fuse(torch.cat([context, low], dim=1))
        logits = F.interpolate(self.classifier(decoder), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"logits": logits, "decoder": decoder, "backbone": high, "aux": stage3}

    def check_weights(self, state: Mapping[str, Tensor], path: Path) -> None:
        refuse_plain_head(state, path)


def refuse_plain_head(state: Mapping[str, Any], path: Path) -> None:
    """Weights of the plain DeepLabV3+ of earlier hiposeg versions are refused by what they are, with the fix,
    instead of a list of missing and unexpected state-dict keys."""
    if PLAIN_HEAD_KEY in state:
        raise plain_head_error(path)


def plain_head_error(path: Path) -> UserError:
    return UserError(
        f"{path} holds a DeepLabV3+ with the plain ASPP and plain 3x3 decoder convolutions that earlier "
        f"hiposeg versions built; this hiposeg builds the paper's DeepLabV3+ with separable convolutions, which cannot load those "
        "weights",
        hint="Train the model again with this hiposeg (`hiposeg train`), or run the file's torch-export (.pt2) or "
             "ONNX export made by the hiposeg that trained it (programs need no hiposeg model code), or use "
             "that hiposeg version for this file.")


def check_arch(arch: Mapping[str, Any], path: Path) -> None:
    """An exported `arch` record of this family: one without a head was written by an earlier hiposeg, whose
    DeepLabV3+ was the plain one; any other head is unknown here."""
    head = arch.get("head")
    if head is None:
        raise plain_head_error(path)
    if head != HEAD:
        raise UserError(f"{path} holds a DeepLabV3+ with the head {head!r}; this hiposeg builds only {HEAD!r}",
                        hint="Use the hiposeg version that exported it, or export it again.")


def build(cfg: ModelConfig, num_classes: int) -> DeepLabV3Plus:
    """DeepLabV3+ of `cfg.backbone` / `cfg.output_stride` / `cfg.decoder_channels`, random weights
    (`models.build_segmenter` loads `cfg.pretrained` afterwards, for every family alike)."""
    return DeepLabV3Plus(num_classes, cfg.backbone, cfg.output_stride, cfg.decoder_channels)


FAMILY = Family("deeplabv3plus", build, arch_fields=("backbone", "output_stride", "decoder_channels"),
                program_ops=PROGRAM_OPS, arch_tags={"head": HEAD}, check_arch=check_arch)
