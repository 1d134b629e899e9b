"""What every export format shares: the metadata record, the loaded model, program input bounds.

Metadata (`model_metadata`, the same record in every format): architecture (`arch`, from which
`hiposeg.models.build_segmenter` rebuilds the segmenter), hierarchy, class names and colours of both
training levels, the fine->coarse map pi, input normalisation, training crop, dataset, iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hiposeg import __version__, checkpoint
from hiposeg.config import DEFAULT_FAMILY, TrainConfig
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.models import Family, Segmenter, arch_config, arch_record, build_segmenter, family_named, family_of
from hiposeg.models.segmenter import crop_to_input, pad_to_multiple
from hiposeg.safeload import load_json

METADATA_NAME = "hiposeg.json"  # torch-export extra file / ONNX metadata_props key
# Input bounds of the program formats: dynamic H and W up to beyond full-resolution Mapillary images
# (~5000 px; larger inputs go through sliding windows). Below 17 px the stride-16 feature map collapses
# to 1x1 and torch.export needs a separate graph, so the programs start at 32 (a family can ask for
# more: `Family.min_side`; its programs may also take only multiples of `Family.input_multiple`).
MIN_SIDE, MAX_SIDE, MAX_BATCH = 32, 8192, 256
# BatchNorm's running statistics: state-dict entries that are buffers, not learned parameters.
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
REEXPORT_HINT = "Export the model again with `hiposeg export`."


@dataclass
class InferenceModel:
    """A callable segmenter (normalised image batch -> fine logits) plus what is needed to use it."""

    module: nn.Module
    hierarchy: Hierarchy
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: tuple[int, int]
    data_root: Path | None
    source: str  # "checkpoint" (a training checkpoint or run dir) or one of export.FORMATS
    metadata: dict[str, Any] = field(default_factory=dict)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameters_in(state: dict[str, torch.Tensor]) -> int:
    """The learned values of a state dict: `count_parameters` of the module it came from, read from
    the entries themselves (every tensor but BatchNorm's running statistics)."""
    return sum(t.numel() for name, t in state.items() if name.rsplit(".", 1)[-1] not in BN_STATISTICS)


def model_metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Everything but the weights, as JSON-compatible data, from a training checkpoint."""
    cfg = TrainConfig.model_validate(ckpt["config"])
    h = Hierarchy.from_dict(ckpt["hierarchy"])
    family = family_of(cfg.model)
    return {
        "format": checkpoint.MODEL_FORMAT,
        "hiposeg_version": __version__,
        "torch_version": str(torch.__version__),
        "arch": arch_record(cfg.model, h.num_fine),
        "hierarchy": h.to_dict(),
        "classes": {"fine": h.names(h.fine_level), "coarse": h.names(h.coarse_level)},
        "colors": {"fine": h.colors(h.fine_level).tolist(), "coarse": h.colors(h.coarse_level).tolist()},
        "fine_to_coarse": h.fine_to_coarse.tolist(),
        "normalization": {"mean": list(cfg.data.mean), "std": list(cfg.data.std)},
        "input": {"layout": "NCHW float32, RGB scaled to [0, 1] then (x - mean) / std", "min_side": family.min_side,
                  "multiple": family.input_multiple},
        "output": {"layout": "NKHW float32 fine-class logits at the input size", "num_classes": h.num_fine},
        "crop": list(cfg.data.crop),
        "data": str(cfg.data.resolved_root()),
        "trained": {"iteration": ckpt["iteration"], "best": ckpt.get("best")},
    }


def segmenter_of(arch: dict[str, Any], path: Path) -> Segmenter:
    """A freshly built segmenter of an `arch` record (random weights), by the one model builder."""
    cfg, num_classes = arch_config(arch, path)
    return build_segmenter(cfg, num_classes)


def load_weights(module: Segmenter, arch: dict[str, Any], state_dict: dict[str, Any], path: Path) -> None:
    """`module.load_state_dict`; weights of an architecture the family no longer builds are refused by
    name (`Segmenter.check_weights`), others that do not fit are a UserError naming the file and its `arch`."""
    module.check_weights(state_dict, path)
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{path} does not match its recorded architecture {arch}: {str(e)[:300]}",
                        hint="The file was edited or damaged: export it again from the run's checkpoint.") from None


def segmenter_with_weights(arch: dict[str, Any], state_dict: dict[str, Any], path: Path) -> Segmenter:
    """The segmenter of an `arch` record holding `state_dict`, in eval mode."""
    module = segmenter_of(arch, path)
    load_weights(module, arch, state_dict, path)
    return module.eval()


def metadata_json(text: str | bytes, path: Path) -> Any:
    """The metadata record of a program file (torch-export extra file, ONNX property), nesting bounded."""
    return load_json(text or "null", f"the hiposeg metadata ({METADATA_NAME}) of {path}", hint=REEXPORT_HINT)


def check_metadata(meta: Any, path: Path) -> dict[str, Any]:
    """A program file's metadata record: written by `hiposeg export`, with every field the loaders read."""
    if not isinstance(meta, dict) or meta.get("format") != checkpoint.MODEL_FORMAT:
        raise UserError(f"{path} has no hiposeg metadata ({METADATA_NAME}): it was not written by `hiposeg export`",
                        hint="Export the model with `hiposeg export RUN --format ...`.")
    checkpoint.check_fields(meta, path, checkpoint.ModelMetadata)
    return meta


def program_example(family: Family) -> tuple[torch.Tensor, dict[str, Any]]:
    """The traced example and the dynamic batch/height/width dims of the family's programs: sides from
    its `min_side` to MAX_SIDE, multiples of its `input_multiple` (then the loaders pad, `BoundedInput`)."""
    m = family.input_multiple
    sides = {axis: torch.export.Dim(name, min=-(-family.min_side // m), max=MAX_SIDE // m)
             for axis, name in ((2, "height"), (3, "width"))}
    dims = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH),
            **{axis: dim if m == 1 else m * dim for axis, dim in sides.items()}}
    return torch.zeros(2, 3, 128, 160), {"x": dims}


def family_of_record(meta: dict[str, Any]) -> Family:
    """The family of an exported model's (checked) metadata record."""
    return family_named(meta["arch"].get("name", DEFAULT_FAMILY))


class BoundedInput(nn.Module):
    """Base of the program adapters: rejects inputs outside the program's shape range with a UserError
    (instead of a guard failure deep inside the runtime), naming the way around it; pads inputs to
    the multiple of `multiple` the program takes and crops its logits back (`run`)."""

    def __init__(self, min_side: int, max_side: int | None, max_batch: int | None, multiple: int = 1) -> None:
        super().__init__()
        self.min_side, self.max_side, self.max_batch, self.multiple = min_side, max_side, max_batch, multiple

    def run(self, program: Any, x: torch.Tensor) -> torch.Tensor:
        """The program's logits for `x`, padded (zeros at the bottom and right, as the segmenter
        pads itself) to the sides the program takes."""
        self.check(x)
        height, width = x.shape[-2:]
        return crop_to_input(program(pad_to_multiple(x, self.multiple)), height, width, 1)

    def check(self, x: torch.Tensor) -> None:
        b, _, h, w = x.shape
        self.check_size(b, h, w)

    def check_size(self, b: int, h: int, w: int) -> None:
        """The check of `check`, for a batch of `b` images of h x w pixels that is not built yet (eval and
        predict ask before anything is written)."""
        if min(h, w) < self.min_side or (self.max_side and max(h, w) > self.max_side):
            sides = f"{self.min_side} to {self.max_side}" if self.max_side else f"at least {self.min_side}"
            raise UserError(f"this exported model takes images of {sides} pixels per side; got {h}x{w}",
                            hint="Use --mode slide (windows of the training crop), or the hiposeg format.")
        if self.max_batch and b > self.max_batch:
            raise UserError(f"this exported model takes at most {self.max_batch} images per batch; got {b}",
                            hint="Use a smaller --batch-size.")
