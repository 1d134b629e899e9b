"""Segmentation models: `build_segmenter` is the one builder (training, export, eval, predict).

    segmenter.py      the interface every family implements (`Segmenter`) and its registration (`Family`)
    deeplabv3plus.py  DeepLabV3+, the paper's model; resnet.py its backbones; pretrained.py local weights
    training.py       the training wrapper with the projection head (training only)

An exported model records its architecture as `arch_record(cfg, num_classes)`; `arch_config` maps
that record back onto a model configuration, so the same builder rebuilds it. Adding a family: its
module (a `Segmenter` and a `Family`), one entry in FAMILIES, its tests; see README "Project layout".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hiposeg.config import ModelConfig
from hiposeg.errors import UserError
from hiposeg.models import deeplabv3plus
from hiposeg.models.segmenter import Family, Segmenter

FAMILIES: dict[str, Family] = {f.name: f for f in (deeplabv3plus.FAMILY,)}
# What a hiposeg torch.export program may call: the union of the registered families' operators.
PROGRAM_OPS: frozenset[str] = frozenset().union(*(f.program_ops for f in FAMILIES.values()))

__all__ = ["FAMILIES", "PROGRAM_OPS", "Family", "Segmenter", "arch_config", "arch_record", "build_segmenter"]


def family_of(cfg: ModelConfig) -> Family:
    """The family a model configuration builds. DeepLabV3+ is the only one, so `ModelConfig` has no
    field naming it; the second family adds that field and this function reads it."""
    return FAMILIES[deeplabv3plus.FAMILY.name]


def build_segmenter(cfg: ModelConfig, num_classes: int) -> Segmenter:
    """THE model builder: the segmenter of `cfg` over `num_classes` fine classes, with the local
    pretrained backbone `cfg.pretrained` loaded if set."""
    return family_of(cfg).build(cfg, num_classes)


def arch_record(cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    """The `arch` record of an exported model: the family, its architecture fields and tags, the class count."""
    family = family_of(cfg)
    return {"name": family.name, **{f: getattr(cfg, f) for f in family.arch_fields}, **family.arch_tags,
            "num_classes": num_classes}


def arch_config(arch: dict[str, Any], path: Path) -> tuple[ModelConfig, int]:
    """(model configuration, class count) of an exported model's `arch` record (already checked for
    its fields' types), for `build_segmenter`. Exported files name their family since the first one."""
    family = FAMILIES.get(arch.get("name", deeplabv3plus.FAMILY.name))
    if family is None:
        raise UserError(f"{path} holds a {arch['name']!r} model, a family this hiposeg does not know "
                        f"({', '.join(FAMILIES)})", hint="Use the hiposeg version that exported it, or export it again.")
    if family.check_arch is not None:
        family.check_arch(arch, path)
    return ModelConfig(**{f: arch[f] for f in family.arch_fields}), arch["num_classes"]
