"""What every model family implements, so that training, export, eval and predict need nothing else.

A segmenter maps a normalised image batch to fine-class logits at the input size. The training
wrapper (`models/training.py`) reads two more features through `forward_features`; export traces
`forward` only. A family (DeepLabV3+ today; HRNet, SegFormer next) registers a `Family` in
`models/__init__.py`: how to build it from the model configuration, which configuration fields
its exported `arch` record keeps, and the operators its `torch.export` programs may call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from hiposeg.config import ModelConfig


class Segmenter(nn.Module, ABC):
    """The interface of a model family.

    `num_classes`: the fine classes (coarse predictions are the fine argmax mapped through pi).
    `decoder_channels`: channels of `forward_features(x)["decoder"]`, the stride-4 feature the
    projection head reads by default. `backbone_channels`: channels of `["backbone"]`, the last
    backbone stage (`model.embed_source: backbone`). `aux_channels`: channels of `["aux"]`, the
    feature an auxiliary head reads during training (`model.aux_head`; stage 3 of a ResNet); 0 for a
    family without one.
    """

    num_classes: int
    decoder_channels: int
    backbone_channels: int
    aux_channels: int = 0

    @abstractmethod
    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """{"logits": (B, K, H, W) at the input size, "decoder": (B, decoder_channels, H/4, W/4),
        "backbone": (B, backbone_channels, h, w)}, plus "aux": (B, aux_channels, h', w') if aux_channels."""

    def check_weights(self, state: Mapping[str, Tensor], path: Path) -> None:
        """Refuse, with a UserError naming `path` and the fix, weights that an earlier version of this
        family wrote for an architecture it no longer builds (checked before `load_state_dict`)."""

    def forward(self, x: Tensor) -> Tensor:
        """(B, num_classes, H, W) fine-class logits at the input size; what exported programs run."""
        return self.forward_features(x)["logits"]


@dataclass(frozen=True)
class Family:
    """A model family as the rest of hiposeg sees it.

    `arch_fields`: the `ModelConfig` fields that define its architecture; the exported `arch`
    record holds them (plus "name" and "num_classes"), so `build` rebuilds the exported model.
    `program_ops`: every operator its `torch.export` programs call, at every configuration; the
    .pt2 loader refuses any other (export/torch_export.py).
    `arch_tags`: fixed entries of the `arch` record that say what this hiposeg builds (DeepLabV3+: its
    head), so a file of another architecture of the family is never loaded in silence; `check_arch`
    refuses a record this hiposeg cannot build (e.g. one of an earlier version), naming the fix.
    """

    name: str
    build: Callable[[ModelConfig, int], Segmenter]
    arch_fields: tuple[str, ...]
    program_ops: frozenset[str]
    arch_tags: Mapping[str, Any] = field(default_factory=dict)
    check_arch: Callable[[Mapping[str, Any], Path], None] | None = None


def init_new_layers(module: nn.Module) -> None:
    """He init for the convs that no pretrained file provides, as torchvision does for ResNet; BN
    to identity. Used by the decoder heads, the projection head and the auxiliary head."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
