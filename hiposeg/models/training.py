"""The training wrapper: a segmenter plus the training-only heads, the projection head g_phi (eq. 3)
and the optional auxiliary FCN head.

The heads live here, not in the segmenter, so an exported model is the segmenter alone and stripping
is provably complete; a CE-only run builds no projection head, a run without `model.aux_head` no
auxiliary head. Training code only: export, eval and predict never import this module
(tests/test_inference_without_training_code.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiposeg.errors import UserError
from hiposeg.models.segmenter import Segmenter, init_new_layers

AUX_CHANNELS = 256  # mmsegmentation's FCNHead in its DeepLabV3+ configs: channels=256, num_convs=1
AUX_DROPOUT = 0.1


class ProjectionHead(nn.Module):
    """g_phi: conv1x1 -> BN -> ReLU -> conv1x1 (d' = embed_dim), then L2-normalise over channels (eq. 3).

    The ContrastiveSeg/HSSN head. The hidden width is the input width capped at 512 (256 on the decoder
    feature): HSSN's 2048-wide hidden layer on stage 4 would cost ~34 GMAC per 512x1024 image.
    The output is float32 even under autocast: the prototype branch computes in fp32.
    """

    def __init__(self, in_channels: int, embed_dim: int = 256, hidden_channels: int | None = None) -> None:
        super().__init__()
        hidden = hidden_channels or min(in_channels, 512)
        self.mlp = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                 nn.ReLU(inplace=True), nn.Conv2d(hidden, embed_dim, 1))
        init_new_layers(self.mlp)

    def forward(self, x: Tensor) -> Tensor:
        z = self.mlp(x)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.normalize(z.float(), p=2, dim=1)  # eq. 3


class AuxiliaryHead(nn.Module):
    """mmsegmentation's auxiliary FCNHead, as its DeepLabV3+ configs train it on ResNet stage 3:
    conv3x3 (-> 256) -> BN -> ReLU -> dropout 0.1 -> conv1x1 over the fine classes, upsampled to the
    input. Its cross-entropy is added with weight `model.aux_weight` (mmsegmentation: 0.4)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fcn = nn.Sequential(nn.Conv2d(in_channels, AUX_CHANNELS, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(AUX_CHANNELS), nn.ReLU(inplace=True), nn.Dropout(AUX_DROPOUT),
                                 nn.Conv2d(AUX_CHANNELS, num_classes, 1))
        init_new_layers(self.fcn)
        nn.init.normal_(self.fcn[-1].weight, std=0.01)  # as the segmenter's classifier

    def forward(self, feature: Tensor, size: torch.Size) -> Tensor:
        return F.interpolate(self.fcn(feature), size=size, mode="bilinear", align_corners=False)


class TrainingOutputs(NamedTuple):
    """What a training forward gives the criterion: fine logits at the input size, the L2-normalised
    float32 embeddings (B, d', h, w) or None, the auxiliary head's logits at the input size or None."""

    logits: Tensor
    embeddings: Tensor | None
    aux_logits: Tensor | None


class HiPoSegNet(nn.Module):
    """Training wrapper: segmenter + projection head (+ auxiliary head), through the `Segmenter`
    interface only, so any model family trains with the prototype branch."""

    def __init__(self, segmenter: Segmenter, embed_dim: int = 256, embed_source: str = "decoder",
                 with_projection: bool = True, aux_head: bool = False) -> None:
        super().__init__()
        if embed_source not in ("decoder", "backbone"):
            raise ValueError(f"embed_source must be 'decoder' or 'backbone', got {embed_source!r}")
        if aux_head and not segmenter.aux_channels:
            raise UserError(f"model.aux_head: the {type(segmenter).__name__} model has no feature for an auxiliary "
                            "head", hint="Drop --set model.aux_head=true for this model.")
        self.segmenter = segmenter
        self.embed_source = embed_source
        in_channels = segmenter.decoder_channels if embed_source == "decoder" else segmenter.backbone_channels
        self.projection: ProjectionHead | None = ProjectionHead(in_channels, embed_dim) if with_projection else None
        self.aux_head: AuxiliaryHead | None = (AuxiliaryHead(segmenter.aux_channels, segmenter.num_classes)
                                               if aux_head else None)

    def forward(self, x: Tensor, with_embeddings: bool = True) -> TrainingOutputs:
        """Embeddings are None when `with_embeddings` is False or the net was built without a projection
        head; without them and without an auxiliary head this is the plain segmenter forward."""
        embed = with_embeddings and self.projection is not None
        if not embed and self.aux_head is None:
            return TrainingOutputs(self.segmenter(x), None, None)
        feats = self.segmenter.forward_features(x)
        embeddings = self.projection(feats[self.embed_source]) if embed else None
        aux = self.aux_head(feats["aux"], x.shape[-2:]) if self.aux_head is not None else None
        return TrainingOutputs(feats["logits"], embeddings, aux)
