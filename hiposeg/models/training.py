"""The training wrapper: a segmenter plus the projection head g_phi (eq. 3).

The head lives here, not in the segmenter, so an exported model is the segmenter alone and stripping
is provably complete; a CE-only run builds no head at all. Training code only: export, eval and
predict never import this module (tests/test_inference_without_training_code.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiposeg.models.segmenter import Segmenter, init_new_layers


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


class HiPoSegNet(nn.Module):
    """Training wrapper: segmenter + projection head, through the `Segmenter` interface only, so any
    model family trains with the prototype branch."""

    def __init__(self, segmenter: Segmenter, embed_dim: int = 256, embed_source: str = "decoder",
                 with_projection: bool = True) -> None:
        super().__init__()
        if embed_source not in ("decoder", "backbone"):
            raise ValueError(f"embed_source must be 'decoder' or 'backbone', got {embed_source!r}")
        self.segmenter = segmenter
        self.embed_source = embed_source
        in_channels = segmenter.decoder_channels if embed_source == "decoder" else segmenter.backbone_channels
        self.projection: ProjectionHead | None = ProjectionHead(in_channels, embed_dim) if with_projection else None

    def forward(self, x: Tensor, with_embeddings: bool = True) -> tuple[Tensor, Tensor | None]:
        """(logits at input size, L2-normalised float32 embeddings (B, d', h, w) or None).

        Embeddings are None when `with_embeddings` is False or the net was built without a head; then
        the head is not run at all (the plain segmenter forward).
        """
        if not with_embeddings or self.projection is None:
            return self.segmenter(x), None
        feats = self.segmenter.forward_features(x)
        return feats["logits"], self.projection(feats[self.embed_source])
