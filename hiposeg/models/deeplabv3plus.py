"""DeepLabV3+ (Chen et al., 2018) on a torchvision ResNet: the paper's segmenter.

Backbone, ASPP, stride-4 decoder, a classifier over the FINE classes. It is the only thing that is
ever exported; the projection head lives in the training wrapper (`models/training.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from hiposeg.config import ModelConfig
from hiposeg.models.pretrained import load_pretrained_backbone
from hiposeg.models.resnet import ResNetBackbone
from hiposeg.models.segmenter import Family, Segmenter, init_new_layers

ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}  # DeepLabV3+ paper: rates double when the stride halves
DECODER_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48

# The operators of every DeepLabV3+ program hiposeg exports (ResNet-18/50/101, output stride 8 and 16).
PROGRAM_OPS = frozenset({
    "torch.ops.aten.conv2d.default", "torch.ops.aten.batch_norm.default", "torch.ops.aten.relu.default",
    "torch.ops.aten.relu_.default", "torch.ops.aten.add_.Tensor", "torch.ops.aten.max_pool2d.default",
    "torch.ops.aten.adaptive_avg_pool2d.default", "torch.ops.aten.dropout.default", "torch.ops.aten.cat.default",
    "torch.ops.aten.upsample_bilinear2d.vec", "torch.ops.aten.sym_size.int", "_operator.add", "_operator.floordiv",
})


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DeepLabV3Plus(Segmenter):
    """torchvision ResNet-18/50/101 backbone, output stride 8 (dilated layer3+4) or 16 (dilated layer4), ASPP
    (torchvision.models.segmentation.deeplabv3.ASPP; rates 12/24/36 at OS8, 6/12/18 at OS16), low-level stage-1
    (layer1) features reduced to 48 ch, fused with the upsampled ASPP output by two 3x3 conv-BN-ReLU (256 ch) at
    stride 4, 1x1 classifier over the FINE classes; logits upsampled (bilinear, align_corners=False) to the input.

    The forward path has no data-dependent control flow, so `torch.export` with dynamic H and W works.
    Note: ASPP's image-pooling branch has a BatchNorm over a 1x1 map, so training needs >= 2 images per
    BatchNorm (per process without SyncBatchNorm), as in torchvision's DeepLabV3.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 8) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.output_stride = output_stride
        self.backbone = ResNetBackbone(backbone, output_stride)
        self.decoder_channels = DECODER_CHANNELS
        self.backbone_channels = self.backbone.out_channels
        self.aspp = ASPP(self.backbone.out_channels, ASPP_RATES[output_stride], DECODER_CHANNELS)
        self.reduce_low_level = _conv_bn_relu(self.backbone.low_level_channels, LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(DECODER_CHANNELS + LOW_LEVEL_CHANNELS, DECODER_CHANNELS, 3),
                                  _conv_bn_relu(DECODER_CHANNELS, DECODER_CHANNELS, 3))
        self.classifier = nn.Conv2d(DECODER_CHANNELS, num_classes, 1)
        for module in (self.aspp, self.reduce_low_level, self.fuse):
            init_new_layers(module)
        # Small classifier init (mmsegmentation's conv_seg: N(0, 0.01)): the first losses are ~ln K
        # instead of the large values He init gives a layer followed by no nonlinearity.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """{"logits": (B, K, H, W), "decoder": (B, 256, H/4, W/4), "backbone": stage-4 feature (B, C, H/OS, W/OS)}."""
        low, high = self.backbone(x)
        context = self.aspp(high)
        low = self.reduce_low_level(low)
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=False)
        decoder = self.fuse(torch.cat([context, low], dim=1))
        logits = F.interpolate(self.classifier(decoder), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"logits": logits, "decoder": decoder, "backbone": high}


def build(cfg: ModelConfig, num_classes: int) -> DeepLabV3Plus:
    """DeepLabV3+ of `cfg.backbone` / `cfg.output_stride`; loads the local `cfg.pretrained` file if set."""
    model = DeepLabV3Plus(num_classes, cfg.backbone, cfg.output_stride)
    if cfg.pretrained is not None:
        load_pretrained_backbone(model, Path(cfg.pretrained))
    return model


FAMILY = Family("deeplabv3plus", build, arch_fields=("backbone", "output_stride"), program_ops=PROGRAM_OPS)
