"""Inference-only models: what `hiposeg export` writes and what `eval` / `predict` load.

An exported model is the segmenter alone. The projection head g_phi, the auxiliary head (if the run
trained one) and the prototype memory are entries of the training checkpoint that export counts and
leaves out: it builds the segmenter with
the one model builder (`hiposeg.models.build_segmenter`) from the checkpoint's configuration, loads
the checkpoint's "model" entry, and never builds the training model, so the exported parameter
count equals that of a plain segmenter of the same configuration (the paper's "no additional
inference cost").

One module per format, each holding its write, load and safety checks (README "Export and deployment"):

    plain.py         hiposeg       (.pt)   plain-data dict read with weights_only=True (also reads checkpoints)
    torch_export.py  torch-export  (.pt2)  torch.export program, dynamic batch/H/W; the archive scan
    onnx.py          onnx          (.onnx) ONNX graph, dynamic batch/H/W; needs the optional onnx extra

Every program takes a float32 image batch (B, 3, H, W), normalised with the recorded mean/std, and
returns fine-class logits (B, K, H, W). Coarse predictions are the fine argmax mapped through pi.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from hiposeg import checkpoint
from hiposeg.atomic import TMP_PREFIX
from hiposeg.errors import UserError
from hiposeg.export import onnx, plain, torch_export
from hiposeg.export.common import (REEXPORT_HINT, InferenceModel, count_parameters, family_of_record, load_weights,
                                   model_metadata, parameters_in, segmenter_of)
from hiposeg.hierarchy import Hierarchy
from hiposeg.lock import DirectoryLock
from hiposeg.models import Segmenter
from hiposeg.rundir import CHECKPOINT_DIR, enclosing_run, resolve_checkpoint

# Each format module has NAME, SUFFIX, TOLERANCE, write(segmenter, meta, out), load(path, device) and
# read_metadata(path). Adding a format: its module and one entry here.
FORMAT_MODULES: dict[str, ModuleType] = {m.NAME: m for m in (plain, torch_export, onnx)}
FORMATS: dict[str, str] = {name: m.SUFFIX for name, m in FORMAT_MODULES.items()}
# The largest |exported - reference| logit difference `export` accepts, relative to the logits' scale
# max(1, max |logit|) (float32 rounding grows with the values summed: an untrained ResNet-101 has
# logits ~1e4); each format's module says why its value.
TOLERANCE: dict[str, float] = {name: m.TOLERANCE for name, m in FORMAT_MODULES.items()}
# The training-only heads a checkpoint holds beside the segmenter ("model"): what to call them -> their entry.
TRAINING_HEADS = {"projection head": "projection", "auxiliary head": "aux_head"}
# detect_format's answer -> the module that reads such files ("torch": any torch.save zip).
READERS: dict[str, ModuleType] = {"torch": plain, torch_export.NAME: torch_export, onnx.NAME: onnx}

__all__ = ["FORMATS", "TOLERANCE", "ExportSummary", "InferenceModel", "count_parameters", "detect_format",
           "export_model", "load_inference_model", "model_metadata"]


# ==========================================================================================
# Writing
# ==========================================================================================


@dataclass
class ExportSummary:
    out: Path
    format: str
    max_abs_diff: float
    tolerance: float          # absolute: TOLERANCE[format] x max(1, max |reference logit|)
    check_shape: tuple[int, ...]
    parameters: int           # of the exported model (its state dict's learned values)
    plain_parameters: int     # of a segmenter of the same configuration, built by the one builder
    training_parameters: int  # segmenter + projection head + auxiliary head
    head_parameters: dict[str, int]  # the training-only heads left out: "projection head", "auxiliary head"
    memory_values: int        # prototype memory entries the training state held
    file_bytes: int
    checked_with: str
    model: str = "DeepLabV3+"  # the family, as messages name it


@dataclass
class _Source:
    """What export reads: the metadata record, the segmenter weights, and what it leaves out."""

    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    head_parameters: dict[str, int]
    memory_values: int
    from_checkpoint: bool

    def load_weights(self, segmenter: Segmenter, path: Path) -> None:
        """The weights into `segmenter`, a misfit named as the file's field that holds them."""
        if self.from_checkpoint:
            checkpoint.restore_segmenter({"model": self.state_dict}, path, segmenter)
        else:
            load_weights(segmenter, self.meta["arch"], self.state_dict, path)


def export_model(source: str | Path, out: str | Path, fmt: str = "hiposeg", prefer: str = "best",
                 check_shape: tuple[int, int, int, int] = (2, 3, 97, 161)) -> ExportSummary:
    """Write an inference-only model, reload it, and compare its logits with the trained segmenter's.

    `source` is a run directory, a training checkpoint, or an exported `hiposeg` file (to convert
    it to another format). The check batch is random, at an odd size unlike the traced one, so a
    program that specialised on its example shape fails here rather than in deployment.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == onnx.NAME:
        onnx.require_export()
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the model's file name",
                        hint=f"Example: --out {out / ('model' + FORMATS[fmt])}")
    refuse_foreign_out(out)
    with out_place(out):
        return _export(source, out, fmt, prefer, check_shape)


def _export(source: str | Path, out: Path, fmt: str, prefer: str, check_shape: tuple[int, int, int, int]
            ) -> ExportSummary:
    """The export itself, once --out's place is checked (and held: `out_place`)."""
    src = resolve_checkpoint(source, prefer=prefer)
    read = _read_source(src)
    segmenter = segmenter_of(read.meta["arch"], src)  # by the one model builder, as training builds it
    plain_parameters = count_parameters(segmenter)
    read.load_weights(segmenter, src)
    segmenter.eval()

    # Written and verified under a temporary name beside --out (same suffix, for the loaders), then
    # renamed: --out only ever holds a verified model, and a previous one survives a failed export.
    staged = out.with_name(f"{TMP_PREFIX}{out.stem}.{os.getpid()}{out.suffix}")
    try:
        diff, tolerance, shape, checked_with = _write_and_check(staged, out, fmt, read.meta, segmenter, check_shape)
        os.replace(staged, out)
    except (OSError, RuntimeError) as e:
        cause = checkpoint.write_error(e)  # e.g. ENOSPC, also when torch's zip writer wraps it
        if cause is None:
            raise
        raise UserError(f"could not write {out}: {cause.strerror or cause}",
                        hint="Free disk space or choose another --out; nothing was written there.") from None
    finally:
        staged.unlink(missing_ok=True)
    parameters = parameters_in(read.state_dict)
    return ExportSummary(out, fmt, diff, tolerance, shape, parameters, plain_parameters,
                         parameters + sum(read.head_parameters.values()), read.head_parameters, read.memory_values,
                         out.stat().st_size, checked_with, family_of_record(read.meta).display)


def _read_source(src: Path) -> _Source:
    """A training checkpoint (its segmenter entry; the projection head, auxiliary head and prototype
    memory entries are only counted) or a `hiposeg`-format model (to convert)."""
    obj = checkpoint.load(src, expect=(checkpoint.CHECKPOINT_FORMAT, checkpoint.MODEL_FORMAT))
    if obj["format"] == checkpoint.MODEL_FORMAT:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        return _Source(meta, obj["state_dict"], {}, 0, from_checkpoint=False)
    # checkpoints written before the auxiliary head existed have no "aux_head" entry
    heads = {name: parameters_in(obj.get(entry, {})) for name, entry in TRAINING_HEADS.items()}
    memory_values = sum(t.numel() for t in obj["memory"].values())
    return _Source(model_metadata(obj), obj["model"], heads, memory_values, from_checkpoint=True)


def _write_and_check(staged: Path, out: Path, fmt: str, meta: dict[str, Any], segmenter: nn.Module,
                     check_shape: tuple[int, int, int, int]) -> tuple[float, float, tuple[int, ...], str]:
    """Write `staged` in `fmt`, reload it as eval/predict would, compare its logits with `segmenter`'s.
    Returns (max difference, tolerance, check shape, what ran the check)."""
    FORMAT_MODULES[fmt].write(segmenter, meta, staged)
    checked_with = fmt
    if fmt == onnx.NAME and not onnx.has_runtime():
        run, checked_with = onnx.reference_runner(staged), "onnx.reference (onnxruntime is not installed)"
        check_shape = onnx.REFERENCE_CHECK_SHAPE
    else:
        run = load_inference_model(staged).module
    x = torch.randn(*check_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = segmenter(x), run(x)
    diff = float((got.float() - want.float()).abs().max()) if got.shape == want.shape else float("inf")
    tolerance = TOLERANCE[fmt] * max(1.0, float(want.abs().max()))
    if not diff <= tolerance:
        what = (f"its logits differ from the training model's by up to {diff:.3g} (tolerance {tolerance:.3g})"
                if got.shape == want.shape else
                f"its output shape {tuple(got.shape)} is not the training model's {tuple(want.shape)}")
        fix = ("Check the disk holding --out and export again" if fmt == plain.NAME else
               "Export in the hiposeg format instead (it reloads the training module itself)")
        versions = "torch and onnxruntime versions" if fmt == onnx.NAME else "torch version"
        raise UserError(f"{out} was not written: the exported model failed its check (reloaded, {what})",
                        hint=f"{fix}; if it persists, please report it with your {versions}.")
    return diff, tolerance, tuple(check_shape), checked_with


def refuse_foreign_out(out: Path) -> None:
    """--out may replace a model `hiposeg export` wrote (it is staged and verified before the rename),
    nothing else: a training checkpoint, a file of another tool, a link or a special file is refused
    before any work. Recognised by content, with the format's own safe reader."""
    if not (out.exists() or out.is_symlink()):
        return
    if not is_exported_model(out):
        raise UserError(f"--out {out} exists and is not a model written by `hiposeg export`: export would replace it",
                        hint="Choose another --out, or remove that file yourself if it is no longer needed.")


@contextlib.contextmanager
def out_place(out: Path) -> Iterator[None]:
    """Where --out may be written: never inside a prepared dataset (whatever the file), never in a run's
    checkpoints/ folder (its training checkpoints only), and inside a run directory only while no
    other process holds it (its lock is held until the model is in place)."""
    from hiposeg.data.dataset import refuse_prepared_dataset

    refuse_prepared_dataset(out, "--out")
    run = enclosing_run(out)
    if run is None:
        yield
        return
    if out.resolve().parent == (run / CHECKPOINT_DIR).resolve():
        raise UserError(f"--out {out} is in the {CHECKPOINT_DIR}/ folder of the run directory {run}, which holds that "
                        "run's training checkpoints only",
                        hint=f"Write the model elsewhere, e.g. --out {run / 'model.pt'}.")
    with DirectoryLock(run, "run directory"):
        yield


def is_exported_model(path: Path) -> bool:
    """Whether `path` is a regular file holding a model (any format) with hiposeg's metadata."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        READERS[detect_format(path)].read_metadata(path)
    except (UserError, OSError):
        return False
    return True


# ==========================================================================================
# Loading
# ==========================================================================================


def detect_format(path: Path) -> str:
    """By content: "torch-export" (a zip archive with `archive_format`), "torch" (a torch.save zip, or
    anything else for checkpoint.load to diagnose), or "onnx" (a protobuf ModelProto, whose first
    byte is the tag of field 1, ir_version: 0x08). A damaged file goes by its suffix to the loader
    whose message fits it."""
    names: list[str] = []
    if zipfile.is_zipfile(path):
        with contextlib.suppress(zipfile.BadZipFile, OSError, ValueError):  # damaged: the suffix decides
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
    if names:
        return torch_export.NAME if any(n.lower().endswith("/archive_format") for n in names) else "torch"
    if path.suffix.lower() == torch_export.SUFFIX:
        return torch_export.NAME
    with open(path, "rb") as f:
        first = f.read(1)
    return onnx.NAME if first == b"\x08" or path.suffix.lower() == onnx.SUFFIX else "torch"


def load_inference_model(path: str | Path, prefer: str = "best", device: str | torch.device = "cpu") -> InferenceModel:
    """A run directory, a training checkpoint, or a model exported in any of FORMATS, on `device`."""
    p = resolve_checkpoint(path, prefer=prefer)
    if p.is_file() and p.stat().st_size == 0:
        raise UserError(f"model file {p} is empty (0 bytes): it was never written completely",
                        hint="Export it again with `hiposeg export`.")
    reader = READERS[detect_format(p)] if p.is_file() else plain
    source, meta, module = reader.load(p, torch.device(device))
    try:
        h = Hierarchy.from_dict(meta["hierarchy"])
        norm = meta["normalization"]
        return InferenceModel(module, h, tuple(norm["mean"]), tuple(norm["std"]), tuple(meta["crop"]),
                              Path(meta["data"]) if meta.get("data") else None, source=source, metadata=meta)
    except (KeyError, TypeError) as e:
        raise UserError(f"{p} lacks the hiposeg metadata it needs (missing {e})", hint=REEXPORT_HINT) from None
