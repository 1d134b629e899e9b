"""segmentation_models_pytorch's encoder-decoder models behind one adapter: SegFormer (MiT-B0..B5
encoders with the all-MLP decoder, the paper's Table 9 SegFormer), and FPN and U-Net on ResNet or
EfficientNet encoders (beyond the paper: HiPoSeg plugs into any of them the same way).

smp builds the network; the adapter only calls its parts: `encoder` -> `decoder` -> the 1x1/3x3
conv of its segmentation head. The decoder output is the feature the projection head reads
(SegFormer: the fused 256-channel stride-4 feature; FPN: 128 channels at stride 4). U-Net's decoder
ends at stride 1 with 16 channels: the projection head reads it average-pooled 4x4 to stride 4 (no
parameters, one pass over a 16-channel map; the embeddings then start from 16 channels, which is
less than the 256 of the other families). Logits are the head's conv output upsampled to the
input (bilinear with smp's align_corners), so for inputs smp accepts the adapter returns exactly
smp's own forward. Models that smp marks as needing sides divisible by the encoder's stride (32;
all three here but U-Net) get other inputs zero-padded at the bottom and right, and cropped back.

The state dict keeps smp's names under `model.` (`model.encoder.*`, `model.decoder.*`,
`model.segmentation_head.0.*`), so smp's own model loads an exported state dict with that prefix
removed. ImageNet weights: smp's encoder weights from its Hugging Face repositories
(`smp-hub/<encoder>.imagenet`) at the revision smp pins.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from hiposeg.config import ModelConfig
from hiposeg.models.hub import HubFile
from hiposeg.models.segmenter import Family, Segmenter, crop_to_input, pad_to_multiple

PROJECTION_STRIDE = 4  # the stride of the feature the projection head reads in every family
REQUIRES = (("segmentation_models_pytorch", "segmentation-models-pytorch"),)
MIT = tuple(f"mit_b{i}" for i in range(6))
# The ImageNet classifiers smp's encoders drop from their weight files (ResNet, EfficientNet, MiT).
ENCODER_HEADS = ("fc.", "_fc.", "head.")
CNN_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", *(f"efficientnet-b{i}" for i in range(8)))

# Operators of the programs hiposeg exports, collected per encoder kind at its smallest variant.
_COMMON_OPS = frozenset({
    "torch.ops.aten.conv2d.default", "torch.ops.aten.batch_norm.default", "torch.ops.aten.relu_.default",
    "torch.ops.aten.add.Tensor", "torch.ops.aten.add_.Tensor", "torch.ops.aten.cat.default",
    "torch.ops.aten.slice.Tensor", "torch.ops.aten.upsample_bilinear2d.vec", "torch.ops.aten.upsample_nearest2d.vec",
    "torch.ops.aten.sym_size.int", "_operator.add", "_operator.floordiv", "_operator.mul",
})
_MIT_OPS = frozenset({  # mit_b0: overlapping patch embeddings, efficient self-attention, Mix-FFN
    "torch.ops.aten.contiguous.default", "torch.ops.aten.dropout.default", "torch.ops.aten.empty.memory_format",
    "torch.ops.aten.flatten.using_ints", "torch.ops.aten.gelu.default", "torch.ops.aten.layer_norm.default",
    "torch.ops.aten.linear.default", "torch.ops.aten.matmul.default", "torch.ops.aten.mul.Tensor",
    "torch.ops.aten.permute.default", "torch.ops.aten.reshape.default", "torch.ops.aten.select.int",
    "torch.ops.aten.softmax.int", "torch.ops.aten.transpose.int", "torch.ops.aten.view.default",
})
_CNN_OPS = frozenset({  # resnet18 (max pooling) and efficientnet-b0 (static same padding, SiLU, squeeze-excite)
    "torch.ops.aten.max_pool2d.default", "torch.ops.aten.adaptive_avg_pool2d.default", "torch.ops.aten.pad.default",
    "torch.ops.aten.mul.Tensor", "torch.ops.aten.sigmoid.default", "torch.ops.aten.silu.default",
})
_FPN_OPS = frozenset({"torch.ops.aten.feature_dropout_.default", "torch.ops.aten.group_norm.default",
                      "torch.ops.aten.stack.default", "torch.ops.aten.sum.dim_IntList"})


class EncoderDecoder(Segmenter):
    """An smp model (`architecture` over `encoder`) as a segmenter: its decoder output, brought to
    stride 4, is the feature the projection head reads."""

    def __init__(self, architecture: str, num_classes: int, encoder: str) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.variant = num_classes, encoder
        self.model = getattr(smp, architecture)(encoder_name=encoder, encoder_weights=None, classes=num_classes)
        conv, upsample = self.model.segmentation_head[0], self.model.segmentation_head[1]
        self.decoder_stride = int(upsample.scale_factor) if isinstance(upsample, nn.Upsample) else 1
        if self.decoder_stride > PROJECTION_STRIDE:
            raise ValueError(f"smp.{architecture}'s decoder ends at stride {self.decoder_stride}; the adapter "
                             f"brings decoders at stride <= {PROJECTION_STRIDE} to the projection head")
        self.align_corners = bool(upsample.align_corners) if isinstance(upsample, nn.Upsample) else False
        self.input_multiple = self.model.encoder.output_stride if self.model.requires_divisible_input_shape else 1
        self.decoder_channels = conv.in_channels
        self.backbone_channels = self.model.encoder.out_channels[-1]

    def _decode(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """(padded input, encoder features, decoder output)."""
        padded = pad_to_multiple(x, self.input_multiple)
        features = self.model.encoder(padded)
        return padded, features, self.model.decoder(features)

    def _logits(self, decoder: Tensor, padded: Tensor, height: int, width: int) -> Tensor:
        logits = self.model.segmentation_head[0](decoder)
        if self.decoder_stride > 1:
            logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return crop_to_input(logits, height, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        padded, _, decoder = self._decode(x)
        return self._logits(decoder, padded, x.shape[-2], x.shape[-1])

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """{"logits": (B, K, H, W), "decoder": the decoder output at stride 4 (B, C, H/4, W/4),
        "backbone": the encoder's last stage}."""
        height, width = x.shape[-2:]
        padded, features, decoder = self._decode(x)
        logits = self._logits(decoder, padded, height, width)
        pool = PROJECTION_STRIDE // self.decoder_stride
        embedded = F.avg_pool2d(decoder, pool, ceil_mode=True) if pool > 1 else decoder
        return {"logits": logits, "decoder": crop_to_input(embedded, height, width, PROJECTION_STRIDE),
                "backbone": crop_to_input(features[-1], height, width, self.model.encoder.output_stride)}

    def pretrained_part(self) -> tuple[str, nn.Module, tuple[str, ...]]:
        return "model.encoder", self.model.encoder, ENCODER_HEADS


def build(architecture: str, cfg: ModelConfig, num_classes: int) -> EncoderDecoder:
    return EncoderDecoder(architecture, num_classes, cfg.backbone)


def imagenet(encoder: str) -> HubFile:
    """smp's ImageNet weights of the encoder: its Hugging Face repository at the revision smp pins."""
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders[encoder]["pretrained_settings"]["imagenet"]
    return HubFile(f"segmentation_models_pytorch {encoder}.imagenet", settings["repo_id"],
                   revision=settings["revision"])


def _family(name: str, architecture: str, title: str, variants: tuple[str, ...], default: str,
            ops: frozenset[str]) -> Family:
    return Family(name, partial(build, architecture), arch_fields=("backbone",), program_ops=_COMMON_OPS | ops,
                  variants=variants, default_variant=default, imagenet=imagenet, requires=REQUIRES, min_side=64,
                  input_multiple=32 if architecture != "Unet" else 1, title=title)


FAMILIES = (_family("segformer", "Segformer", "SegFormer", MIT, "mit_b5", _MIT_OPS),
            _family("fpn", "FPN", "FPN", CNN_ENCODERS, "resnet50", _CNN_OPS | _FPN_OPS),
            _family("unet", "Unet", "U-Net", CNN_ENCODERS, "resnet50", _CNN_OPS))
