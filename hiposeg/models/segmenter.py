"""What every model family implements, so that training, export, eval and predict need nothing else.

A segmenter maps a normalised image batch to fine-class logits at the input size. The training
wrapper (`models/training.py`) reads two more features through `forward_features`; export traces
`forward` only. A family (DeepLabV3+, HRNet, SegFormer and the other segmentation_models_pytorch
architectures) registers a `Family` in `models/__init__.py`: how to build it from the model
configuration, its variants (`--backbone`), which configuration fields its exported `arch` record
keeps, the operators its `torch.export` programs may call, where its ImageNet weights come from,
and the optional packages it needs.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

from hiposeg.config import ModelConfig
from hiposeg.errors import UserError

if TYPE_CHECKING:
    from hiposeg.models.hub import WeightsSource

# The optional extra that holds every family beyond DeepLabV3+ (pyproject.toml).
MODELS_EXTRA = "pip install 'hiposeg[models]'  (timm, segmentation-models-pytorch)"


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

    def pretrained_part(self) -> tuple[str, nn.Module, tuple[str, ...]]:
        """(attribute name, module, key prefixes of a classification checkpoint it has no use for):
        where pretrained weights load. By default a torchvision-style `backbone` whose file also holds
        the ImageNet classifier `fc`."""
        return "backbone", self.backbone, ("fc.",)


@dataclass(frozen=True)
class Family:
    """A model family as the rest of hiposeg sees it.

    `arch_fields`: the `ModelConfig` fields that define its architecture; the exported `arch`
    record holds them (plus "name" and "num_classes"), so `build` rebuilds the exported model.
    `program_ops`: every operator its `torch.export` programs call, at every configuration; the
    .pt2 loader refuses any other (export/torch_export.py).
    `variants`: the `--backbone` choices, smallest first (the CPU-sized synthetic recipe trains the
    first); `default_variant`: the paper-scale one, used when no recipe or flag names one.
    `imagenet`: variant -> where its ImageNet weights live (`--pretrained imagenet`; `models/hub.py`).
    `requires`: (module, pip name) of the optional packages it needs (the `models` extra).
    `min_side`, `input_multiple`: what its exported programs take: sides of at least `min_side`,
    multiples of `input_multiple` (the loaders pad to it; the segmenter itself pads any input).
    `arch_tags`: fixed entries of the `arch` record that say what this hiposeg builds (DeepLabV3+: its
    head), so a file of another architecture of the family is never loaded in silence; `check_arch`
    refuses a record this hiposeg cannot build (e.g. one of an earlier version), naming the fix.
    """

    name: str
    build: Callable[[ModelConfig, int], Segmenter]
    arch_fields: tuple[str, ...]
    program_ops: frozenset[str]
    variants: tuple[str, ...] = ()
    default_variant: str = ""
    imagenet: Callable[[str], WeightsSource] | None = None
    requires: tuple[tuple[str, str], ...] = ()
    min_side: int = 32
    input_multiple: int = 1
    title: str = ""  # how messages name it, e.g. "DeepLabV3+"
    arch_tags: Mapping[str, Any] = field(default_factory=dict)
    check_arch: Callable[[Mapping[str, Any], Path], None] | None = None

    @property
    def display(self) -> str:
        return self.title or self.name

    def require(self) -> None:
        """A one-line install hint, instead of an ImportError, when an optional package is missing."""
        for module, pip_name in self.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                raise UserError(f"the {self.name} models need the package {pip_name}, which is not installed",
                                hint=f"Install the optional model families: {MODELS_EXTRA}.") from None


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """`x` zero-padded at the bottom and right to sides that are multiples of `multiple`, for the
    library models whose feature pyramids only line up on such sizes. A no-op (and no graph node in
    an exported program, whose sides are such multiples) when they already are."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def crop_to_input(t: Tensor, height: int, width: int, stride: int) -> Tensor:
    """The part of a stride-`stride` map of a padded input that covers the `height` x `width` input."""
    h, w = -(-height // stride), -(-width // stride)
    return t if tuple(t.shape[-2:]) == (h, w) else t[..., :h, :w]


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
