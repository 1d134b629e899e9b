"""Segmentation models: `build_segmenter` is the one builder (training, export, eval, predict).

    segmenter.py        the interface every family implements (`Segmenter`) and its registration (`Family`)
    deeplabv3plus.py    DeepLabV3+, the paper's model; resnet.py its torchvision backbones
    hrnet.py            HRNetV2 on timm's HRNet (optional `models` extra)
    encoder_decoder.py  SegFormer, FPN, U-Net from segmentation_models_pytorch (optional `models` extra)
    hub.py              ImageNet weights through the owning library's cache; pretrained.py loads them, checked
    training.py         the training wrapper with the projection head (training only)

An exported model records its architecture as `arch_record(cfg, num_classes)`; `arch_config` maps
that record back onto a model configuration, so the same builder rebuilds it. Adding a family: its
module (a `Segmenter` and a `Family`), one entry in FAMILIES, its tests; see README "Project layout".
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hiposeg.config import DEFAULT_FAMILY, ModelConfig, format_validation_error
from hiposeg.errors import UserError
from hiposeg.models import deeplabv3plus, encoder_decoder, hrnet
from hiposeg.models.hub import TorchHubFile, WeightsSource
from hiposeg.models.pretrained import LoadReport, load_state, local_file_fix, read_state_dict
from hiposeg.models.resnet import BACKBONES
from hiposeg.models.segmenter import Family, Segmenter


def _resnet_imagenet(variant: str) -> TorchHubFile:
    """torchvision's original ImageNet weights (IMAGENET1K_V1, e.g. resnet101-63fe2227.pth): the ones
    DeepLabV3+ baselines (torchvision's own segmentation models, mmsegmentation's) start from."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(variant).IMAGENET1K_V1
    return TorchHubFile(f"torchvision {type(weights).__name__}.IMAGENET1K_V1", weights.url)


DEEPLABV3PLUS = replace(deeplabv3plus.FAMILY, variants=tuple(BACKBONES), default_variant="resnet101",
                        imagenet=_resnet_imagenet, title="DeepLabV3+")
FAMILIES: dict[str, Family] = {f.name: f for f in (DEEPLABV3PLUS, hrnet.FAMILY, *encoder_decoder.FAMILIES)}
# What a hiposeg torch.export program may call: the union of the registered families' operators.
PROGRAM_OPS: frozenset[str] = frozenset().union(*(f.program_ops for f in FAMILIES.values()))

__all__ = ["FAMILIES", "PROGRAM_OPS", "Family", "LoadReport", "Segmenter", "arch_config", "arch_record",
           "build_segmenter", "check_model", "family_named", "family_of", "load_pretrained"]


def family_named(name: str) -> Family:
    """The registered family `name` (a validated configuration or exported record names one)."""
    return FAMILIES[name]


def family_of(cfg: ModelConfig) -> Family:
    """The family a model configuration builds (`model.name`)."""
    return FAMILIES[cfg.name]


def build_segmenter(cfg: ModelConfig, num_classes: int, *, pretrained: bool = True) -> Segmenter:
    """THE model builder: the segmenter of `cfg` over `num_classes` fine classes, with the weights
    `cfg.pretrained` names loaded (unless `pretrained=False`: a resumed run's checkpoint replaces them)."""
    family = family_of(cfg)
    family.require()
    segmenter = family.build(cfg.model_copy(update={"pretrained": None}), num_classes)
    if pretrained and cfg.pretrained is not None:
        load_pretrained(segmenter, cfg)
    return segmenter


def imagenet_weights(cfg: ModelConfig) -> WeightsSource:
    family = family_of(cfg)
    family.require()
    return family.imagenet(cfg.backbone)


def check_model(cfg: ModelConfig, with_weights: bool = True) -> None:
    """Before a run writes anything or starts its processes: the family's packages are installed and
    (`with_weights`) the weights `cfg.pretrained` names are on this machine, ImageNet weights
    downloaded into the library's cache once."""
    family_of(cfg).require()
    if not with_weights:
        return
    if cfg.pretrained == "imagenet":
        imagenet_weights(cfg).fetch()
    elif cfg.pretrained is not None:
        read_state_dict(Path(cfg.pretrained), local_file_fix(cfg.backbone))


def load_pretrained(segmenter: Segmenter, cfg: ModelConfig) -> LoadReport:
    """Load the weights `cfg.pretrained` names (`imagenet` or a file) into the segmenter's pretrained
    part, checked; the report says what loaded."""
    if cfg.pretrained == "imagenet":
        weights = imagenet_weights(cfg)
        path = weights.fetch()
        fix = (f"The cached file is damaged: delete {path} so that it is downloaded again, or pass the weights "
               "with --pretrained PATH.")
        return load_state(segmenter, read_state_dict(path, fix), path, f"imagenet: {weights.describe()}",
                          cfg.backbone, fix)
    path = Path(str(cfg.pretrained))
    fix = local_file_fix(cfg.backbone)
    return load_state(segmenter, read_state_dict(path, fix), path, "file", cfg.backbone, fix)


def arch_record(cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    """The `arch` record of an exported model: the family, its architecture fields and tags, the class count."""
    family = family_of(cfg)
    return {"name": family.name, **{f: getattr(cfg, f) for f in family.arch_fields}, **family.arch_tags,
            "num_classes": num_classes}


def arch_config(arch: dict[str, Any], path: Path) -> tuple[ModelConfig, int]:
    """(model configuration, class count) of an exported model's `arch` record (already checked for
    its fields' types), for `build_segmenter`. Exported files name their family since the first one."""
    family = FAMILIES.get(arch.get("name", DEFAULT_FAMILY))
    if family is None:
        raise UserError(f"{path} holds a {arch['name']!r} model, a family this hiposeg does not know "
                        f"({', '.join(FAMILIES)})", hint="Use the hiposeg version that exported it, or export it again.")
    if family.check_arch is not None:
        family.check_arch(arch, path)
    absent = [f for f in family.arch_fields if arch.get(f) is None]
    if absent:
        raise UserError(f"{path} lacks the field 'arch.{absent[0]}', which every {family.name} model holds",
                        hint="The file was damaged or edited: export the model again.")
    try:
        cfg = ModelConfig(name=family.name, **{f: arch[f] for f in family.arch_fields})
    except ValidationError as e:
        raise UserError(f"{path} has a malformed field 'arch':\n{format_validation_error(e)}",
                        hint="The file was damaged or edited: export the model again.") from None
    return cfg, arch["num_classes"]
