"""Pretrained backbones: a local torchvision ResNet state-dict file, checked before loading.

Nothing is downloaded. Any missing, unreadable or mismatching file is a UserError naming the file,
the mismatching keys/shapes, the architecture the file looks like, and the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from hiposeg.errors import UserError
from hiposeg.models.resnet import BACKBONES

# Blocks per stage of the torchvision ResNets, to name the architecture a state-dict file holds.
_RESNET_LAYOUTS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _guess_resnet(state: dict[str, Tensor]) -> tuple[str | None, str]:
    """(torchvision name or None, how to describe the file) from the blocks per stage of a state dict."""
    kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in state) else "basic"
    blocks = []
    for stage in range(1, 5):
        ids = {k.split(".")[1] for k in state if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        blocks.append(len(ids))
    if not any(blocks):
        return None, "does not look like a torchvision ResNet (no layer1..layer4 keys)"
    name = _RESNET_LAYOUTS.get((kind, tuple(blocks)))
    return name, f"looks like {name}" if name else f"looks like an unknown ResNet ({kind} blocks per stage {blocks})"


def load_pretrained_backbone(model: nn.Module, path: Path) -> None:
    """Load a local torchvision ResNet state dict (e.g. resnet101-63fe2227.pth) into `model.backbone`
    (a `ResNetBackbone`; `model.backbone_name` names its architecture).

    `fc.*` is dropped and "module."/"_orig_mod." prefixes are stripped. Any missing file, unreadable
    file or architecture mismatch raises `UserError` naming the file, the mismatching keys/shapes, the
    architecture the file looks like, and the fix.
    """
    path = Path(path)
    want = model.backbone_name
    fix = (f"Pass a torchvision {want} state dict (from torchvision.models.{want}(weights=...).state_dict(), "
           "e.g. the .pth in ~/.cache/torch/hub/checkpoints) with --pretrained, or choose the matching --backbone.")
    if not path.is_file():
        raise UserError(f"pretrained backbone file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""),
                        hint=fix + " Nothing is downloaded: the file must be on this machine.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the same thing to the user
        raise UserError(f"cannot read pretrained backbone file {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        hint=fix) from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):  # common training-checkpoint layouts
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"pretrained backbone file {path} does not hold a state dict of tensors "
                        f"(got {type(obj).__name__})", hint=fix)
    state = {_strip_prefixes(k): v for k, v in obj.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}

    expected = model.backbone.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # absent from older torchvision files
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        def show(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        details = [f"{name} {len(items)}: {show(items)}" for name, items in
                   (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
                   if items]
        name, description = _guess_resnet(state)
        if name in BACKBONES:
            fix = f"Use --backbone {name} with this file, or pass a torchvision {want} state dict."
        raise UserError(f"pretrained backbone file {path} does not match backbone {want}; the file {description}."
                        "\n  " + "\n  ".join(details), hint=fix)
    model.backbone.load_state_dict(state, strict=False)  # strict=False only for the optional BN counters
