"""HRNetV2 (Wang et al., 2020): timm's HRNet features with the standard segmentation head.

timm builds the network (`features_only=True`); the head and the glue are ours. timm's features
default to the classification "incre" modules (W48: 128/256/512/1024 channels); the HRNetV2 head
reads the raw branch outputs instead (`feature_location=''`; W48: 48/96/192/384 channels at
strides 4/8/16/32): all four upsampled to stride 4 and concatenated (720 channels for W48), one
1x1 conv-BN-ReLU, a 1x1 classifier over the FINE classes (mmsegmentation's `fcn_hr48` head). The
projection head reads the fused 720-channel stride-4 feature.

timm's HRNet fuses its branches with fixed x2^k upsampling, so its branches line up only on sides
that are multiples of 32: the segmenter pads other inputs (zeros at the bottom and right) and crops
what it returns. ImageNet weights: timm's default pretrained tag of the variant (W48: `ms_in1k`,
Hugging Face `timm/hrnet_w48.ms_in1k`), whose classification modules (incre, downsample, final
layer, classifier) the segmenter does not have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiposeg.config import ModelConfig
from hiposeg.models.hub import HubFile
from hiposeg.models.segmenter import Family, Segmenter, crop_to_input, init_new_layers, pad_to_multiple

VARIANTS = ("hrnet_w18_small", "hrnet_w18_small_v2", "hrnet_w18", "hrnet_w30", "hrnet_w32", "hrnet_w40",
            "hrnet_w44", "hrnet_w48", "hrnet_w64")
INPUT_MULTIPLE = 32  # the lowest-resolution branch is at stride 32
BRANCHES = (1, 2, 3, 4)  # timm's feature indices of the four branches (0 is the stride-2 stem)
# The keys of timm's ImageNet checkpoints that only its classification model has.
CLASSIFICATION_MODULES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")

# The operators of every HRNet program hiposeg exports (collected from hrnet_w18_small; the wider
# variants repeat the same blocks).
PROGRAM_OPS = frozenset({
    "torch.ops.aten.conv2d.default", "torch.ops.aten.batch_norm.default", "torch.ops.aten.relu.default",
    "torch.ops.aten.relu_.default", "torch.ops.aten.add.Tensor", "torch.ops.aten.add_.Tensor",
    "torch.ops.aten.cat.default", "torch.ops.aten.upsample_bilinear2d.vec", "torch.ops.aten.upsample_nearest2d.vec",
    "torch.ops.aten.sym_size.int", "_operator.add", "_operator.floordiv", "_operator.mul",
})


class HRNetV2(Segmenter):
    """timm HRNet-W18-small ... W64 branches -> concat at stride 4 -> 1x1 conv-BN-ReLU -> 1x1 classifier;
    logits upsampled (bilinear, align_corners=False) to the input."""

    def __init__(self, num_classes: int, variant: str = "hrnet_w48") -> None:
        super().__init__()
        import timm

        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.variant = num_classes, variant
        self.backbone = timm.create_model(variant, pretrained=False, features_only=True, feature_location="",
                                          out_indices=BRANCHES)
        channels = self.backbone.feature_info.channels()
        self.decoder_channels = sum(channels)
        self.backbone_channels = channels[-1]
        self.fuse = nn.Sequential(nn.Conv2d(self.decoder_channels, self.decoder_channels, 1, bias=False),
                                  nn.BatchNorm2d(self.decoder_channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(self.decoder_channels, num_classes, 1)
        init_new_layers(self.fuse)
        nn.init.normal_(self.classifier.weight, std=0.01)  # as DeepLabV3+'s classifier: first losses ~ln K
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """{"logits": (B, K, H, W), "decoder": (B, sum of branch channels, H/4, W/4), "backbone": the
        stride-32 branch}."""
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, INPUT_MULTIPLE)
        branches = self.backbone(padded)
        size = branches[0].shape[-2:]
        upsampled = [branches[0]] + [F.interpolate(b, size=size, mode="bilinear", align_corners=False)
                                     for b in branches[1:]]
        decoder = self.fuse(torch.cat(upsampled, dim=1))
        logits = F.interpolate(self.classifier(decoder), size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return {"logits": crop_to_input(logits, height, width, 1),
                "decoder": crop_to_input(decoder, height, width, 4),
                "backbone": crop_to_input(branches[-1], height, width, 32)}

    def pretrained_part(self) -> tuple[str, nn.Module, tuple[str, ...]]:
        return "backbone", self.backbone, CLASSIFICATION_MODULES


def build(cfg: ModelConfig, num_classes: int) -> HRNetV2:
    return HRNetV2(num_classes, cfg.backbone)


def imagenet(variant: str) -> HubFile:
    """timm's default ImageNet-1k weights of the variant, from its Hugging Face repository."""
    import timm

    repo = timm.models.get_pretrained_cfg(variant).hf_hub_id
    return HubFile(f"timm {repo.split('/')[-1]}", repo)


FAMILY = Family("hrnet", build, arch_fields=("backbone",), program_ops=PROGRAM_OPS, variants=VARIANTS,
                default_variant="hrnet_w48", imagenet=imagenet, requires=(("timm", "timm"),), min_side=64,
                input_multiple=INPUT_MULTIPLE, title="HRNetV2")
