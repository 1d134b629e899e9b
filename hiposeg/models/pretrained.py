"""Pretrained weights: a file (from a library's cache or given with `--pretrained PATH`), checked
before a single tensor is copied into the model.

A file is read as a state dict (safetensors, or `torch.load(weights_only=True)`), wrapper prefixes
stripped, and compared with the segmenter's pretrained part (`Segmenter.pretrained_part`: the
backbone or encoder): every tensor of the part must be in the file with its shape; keys of the
file's classification head (the part's `dropped` prefixes) are left out and listed. Anything else
(missing keys, keys of another architecture, other shapes, a damaged or truncated file) is a
UserError naming the file and the mismatch; the part is then untouched, never half-loaded. The
returned `LoadReport` says what loaded, for the run's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from hiposeg.errors import UserError
from hiposeg.models.resnet import BACKBONES, ResNetBackbone

# Blocks per stage of the torchvision ResNets, to name the architecture a state-dict file holds.
_RESNET_LAYOUTS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_SHOWN = 5  # keys listed per kind of mismatch


@dataclass
class LoadReport:
    """What a pretrained file gave the model: printed by `train` at the start of a run."""

    file: Path
    source: str  # "imagenet: <library weights>" or "file"
    part: str  # the segmenter's attribute that was loaded, e.g. "backbone"
    loaded: int  # tensors copied
    total: int  # tensors of the part
    dropped: list[str] = field(default_factory=list)  # keys of the file left out (its classification head)

    def line(self) -> str:
        dropped = (f"; left out {len(self.dropped)} key(s) of the file's classification head "
                   f"({_show(self.dropped)})") if self.dropped else ""
        return (f"pretrained {self.part}: loaded {self.loaded}/{self.total} tensors from {self.file} "
                f"({self.source}){dropped}")


def _show(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def guess_resnet(state: dict[str, Tensor]) -> tuple[str | None, str]:
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


def read_state_dict(path: Path, fix: str) -> dict[str, Tensor]:
    """The tensors of a weights file (safetensors or a torch file; a training checkpoint's "state_dict"
    or "model" entry), DDP / torch.compile prefixes stripped. A missing, damaged or truncated file,
    or one that is not a state dict, is a UserError naming it, with `fix` as the hint."""
    if not path.is_file():
        raise UserError(f"pretrained weights file {path} does not exist" + (" (it is a directory)" if path.is_dir()
                                                                            else ""), hint=fix)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip/safetensors error means the same to the user
        raise UserError(f"cannot read pretrained weights file {path} (damaged, truncated or not a weights file): "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", hint=fix) from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):  # common training-checkpoint layouts
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"pretrained weights file {path} does not hold a state dict of tensors "
                        f"(got {type(obj).__name__})", hint=fix)
    return {_strip_prefixes(k): v for k, v in obj.items()}


def load_state(model: nn.Module, state: dict[str, Tensor], path: Path, source: str, variant: str,
               fix: str) -> LoadReport:
    """Copy `state` into `model`'s pretrained part once every tensor of the part is in it with its
    shape; the part is untouched when anything does not fit. For a ResNet backbone the message says
    which ResNet the file looks like."""
    name, part, dropped_prefixes = model.pretrained_part()
    expected = part.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # absent from older torchvision files
    dropped = sorted(k for k in state if k not in expected and k.startswith(dropped_prefixes))
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        details = [f"{kind} {len(items)}: {_show(items)}" for kind, items in
                   (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
                   if items]
        what = ""
        if isinstance(part, ResNetBackbone):
            looks, description = guess_resnet(state)
            what = f"; the file {description}"
            if looks in BACKBONES and looks != variant:
                fix = f"Use --backbone {looks} with this file, or pass the {variant} weights."
        raise UserError(f"pretrained weights file {path} does not match the {name} of {variant}{what}."
                        "\n  " + "\n  ".join(details), hint=fix)
    # The plain nn.Module loader (libraries' encoders override it to drop their own heads, done above);
    # strict=False only for the optional BN counters, every other key was checked.
    nn.Module.load_state_dict(part, state, strict=False)
    return LoadReport(path, source, name, len(state), len(expected), dropped)


def local_file_fix(variant: str) -> str:
    return (f"Pass a weights file of {variant} with --pretrained PATH (a path is read as it is, never downloaded), "
            "or use --pretrained imagenet to fetch the library's ImageNet weights into its cache.")


def load_pretrained_backbone(model: nn.Module, path: Path) -> LoadReport:
    """Load a local torchvision ResNet state dict (e.g. resnet101-63fe2227.pth) into a DeepLabV3+
    `model.backbone`; `fc.*` is dropped. A mismatch names the ResNet the file looks like."""
    path = Path(path)
    fix = local_file_fix(model.backbone_name)
    return load_state(model, read_state_dict(path, fix), path, "file", model.backbone_name, fix)
