"""Inference-only models: what `hiposeg export` writes and what `eval` / `predict` load.

An exported model is the DeepLabV3+ segmenter alone. The projection head g_phi lives in the training
wrapper (`HiPoSegNet.projection`) and the prototype memory in the criterion, so neither is part of the
segmenter: stripping is taking `net.segmenter`, and the exported parameter count equals that of a
plain DeepLabV3+ of the same configuration (the paper's "no additional inference cost").

Three formats, one metadata record (`model_metadata`: architecture, hierarchy, class names and
colours of both training levels, the fine->coarse map pi, input normalisation, training crop):

    hiposeg       (.pt)   plain-data dict, `torch.load(weights_only=True)`: metadata + "state_dict".
                          Needs hiposeg to rebuild the module; the most portable across torch versions.
    torch-export  (.pt2)  a `torch.export` program with dynamic batch, height and width; metadata in the
                          archive's extra file `hiposeg.json`. Runs with plain PyTorch, no hiposeg code.
    onnx          (.onnx) an ONNX graph (dynamic batch/height/width); metadata as JSON in the model's
                          `metadata_props["hiposeg.json"]`. Needs the optional `onnx` extra.

Every program takes a float32 image batch (B, 3, H, W), normalised with the recorded mean/std, and
returns fine-class logits (B, K, H, W). Coarse predictions are the fine argmax mapped through pi.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hiposeg import __version__, checkpoint, rundir
from hiposeg.config import TrainConfig
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.atomic import TMP_PREFIX, atomic_write_bytes
from hiposeg.safeload import load_json

FORMATS: dict[str, str] = {"hiposeg": ".pt", "torch-export": ".pt2", "onnx": ".onnx"}
METADATA_NAME = "hiposeg.json"  # torch-export extra file / ONNX metadata_props key
# Input bounds of the program formats: dynamic H and W up to beyond full-resolution Mapillary images
# (~5000 px; larger inputs go through sliding windows). Below 17 px the stride-16 feature map collapses
# to 1x1 and torch.export needs a separate graph, so the programs start at 32.
MIN_SIDE, MAX_SIDE, MAX_BATCH = 32, 8192, 256
# The largest |exported - training| logit difference `export` accepts, relative to the logits' scale
# max(1, max |logit|): float32 rounding grows with the values summed (an untrained ResNet-101 has logits
# ~1e4). The hiposeg format runs the very same module (exact); torch.export runs the same aten kernels
# after decomposition; ONNX Runtime has its own convolution kernels, whose summation order differs.
TOLERANCE: dict[str, float] = {"hiposeg": 0.0, "torch-export": 1e-5, "onnx": 1e-4}
ONNX_HINT = "Install the optional ONNX support: pip install 'hiposeg[onnx]' (onnx, onnxscript, onnxruntime)."


# ==========================================================================================
# The loaded model
# ==========================================================================================


@dataclass
class InferenceModel:
    """A callable segmenter (normalised image batch -> fine logits) plus what is needed to use it."""

    module: nn.Module
    hierarchy: Hierarchy
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: tuple[int, int]
    data_root: Path | None
    source: str  # "checkpoint" (a training checkpoint or run dir) or one of FORMATS
    metadata: dict[str, Any] = field(default_factory=dict)


def segmenter_from_arch(arch: dict[str, Any]) -> nn.Module:
    from hiposeg.model import DeepLabV3Plus

    return DeepLabV3Plus(arch["num_classes"], backbone=arch["backbone"], output_stride=arch["output_stride"])


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ==========================================================================================
# What an exported model holds
# ==========================================================================================


def model_metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Everything but the weights, as JSON-compatible data, from a training checkpoint."""
    cfg = TrainConfig.model_validate(ckpt["config"])
    h = Hierarchy.from_dict(ckpt["hierarchy"])
    return {
        "format": checkpoint.MODEL_FORMAT,
        "hiposeg_version": __version__,
        "torch_version": str(torch.__version__),
        "arch": {"name": "deeplabv3plus", "backbone": cfg.model.backbone, "output_stride": cfg.model.output_stride,
                 "num_classes": h.num_fine},
        "hierarchy": h.to_dict(),
        "classes": {"fine": h.names(h.fine_level), "coarse": h.names(h.coarse_level)},
        "colors": {"fine": h.colors(h.fine_level).tolist(), "coarse": h.colors(h.coarse_level).tolist()},
        "fine_to_coarse": h.fine_to_coarse.tolist(),
        "normalization": {"mean": list(cfg.data.mean), "std": list(cfg.data.std)},
        "input": {"layout": "NCHW float32, RGB scaled to [0, 1] then (x - mean) / std", "min_side": MIN_SIDE},
        "output": {"layout": "NKHW float32 fine-class logits at the input size", "num_classes": h.num_fine},
        "crop": list(cfg.data.crop),
        "data": str(cfg.data.resolved_root()),
        "trained": {"iteration": ckpt["iteration"], "best": ckpt.get("best")},
    }


def model_payload(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The plain-data (`hiposeg` format) model from a training checkpoint: no head, no memory."""
    return {**model_metadata(ckpt), "state_dict": ckpt["model"]}


def training_model(ckpt: dict[str, Any], path: Path) -> tuple[nn.Module, nn.Module]:
    """(HiPoSegNet with its projection head, criterion with its prototype memory), as trained."""
    from hiposeg.engine import build_model, restore_model

    cfg = TrainConfig.model_validate(ckpt["config"])
    net, criterion = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": None})}),
                                 Hierarchy.from_dict(ckpt["hierarchy"]))
    restore_model(ckpt, path, net, criterion)
    return net.eval(), criterion


# ==========================================================================================
# Writing
# ==========================================================================================


@dataclass
class ExportSummary:
    out: Path
    format: str
    max_abs_diff: float
    tolerance: float          # absolute: TOLERANCE[format] x max(1, max |training logit|)
    check_shape: tuple[int, ...]
    parameters: int           # of the exported model
    plain_parameters: int     # of a freshly built DeepLabV3+ of the same configuration
    training_parameters: int  # segmenter + projection head (0 extra for a CE-only run)
    memory_values: int        # prototype memory entries the training state held
    file_bytes: int
    checked_with: str


def export_model(source: str | Path, out: str | Path, fmt: str = "hiposeg", prefer: str = "best",
                 check_shape: tuple[int, int, int, int] = (2, 3, 97, 161)) -> ExportSummary:
    """Write an inference-only model, reload it, and compare its logits with the training model's.

    `source` is a run directory, a training checkpoint, or an exported `hiposeg` file (to convert
    it to another format). The check batch is random, at an odd size unlike the traced one, so a
    program that specialised on its example shape fails here rather than in deployment.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx_export()
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the model's file name",
                        hint=f"Example: --out {out / ('model' + FORMATS[fmt])}")
    src = rundir.resolve_checkpoint(source, prefer=prefer)
    obj = checkpoint.load(src, expect=(checkpoint.CHECKPOINT_FORMAT, checkpoint.MODEL_FORMAT))
    if obj["format"] == checkpoint.CHECKPOINT_FORMAT:
        meta = model_metadata(obj)
        reference, criterion = training_model(obj, src)
        training_parameters = count_parameters(reference)
        memory_values = sum(t.numel() for t in criterion.state_dict().values())
        state_dict, segmenter = obj["model"], reference.segmenter  # what export keeps of the training model
    else:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        reference = segmenter = build_segmenter_from(obj, src)
        training_parameters, memory_values, state_dict = count_parameters(reference), 0, obj["state_dict"]
    plain = segmenter_from_arch(meta["arch"])  # a freshly built DeepLabV3+, for the parameter comparison

    # Written and verified under a temporary name beside --out (same suffix, for the loaders), then
    # renamed: --out only ever holds a verified model, and a previous one survives a failed export.
    staged = out.with_name(f"{TMP_PREFIX}{out.stem}.{os.getpid()}{out.suffix}")
    try:
        summary = _write_and_check(staged, out, fmt, meta, state_dict, segmenter, reference, check_shape)
        os.replace(staged, out)
    except (OSError, RuntimeError) as e:
        cause = checkpoint.write_error(e)  # e.g. ENOSPC, also when torch's zip writer wraps it
        if cause is None:
            raise
        raise UserError(f"could not write {out}: {cause.strerror or cause}",
                        hint="Free disk space or choose another --out; nothing was written there.") from None
    finally:
        staged.unlink(missing_ok=True)
    return ExportSummary(out, fmt, summary[0], summary[1], tuple(summary[2]), count_parameters(segmenter),
                         count_parameters(plain), training_parameters, memory_values, out.stat().st_size, summary[3])


def _write_and_check(staged: Path, out: Path, fmt: str, meta: dict[str, Any], state_dict: dict[str, Any],
                     segmenter: nn.Module, reference: nn.Module,
                     check_shape: tuple[int, int, int, int]) -> tuple[float, float, tuple[int, ...], str]:
    """Write `staged` in `fmt`, reload it as eval/predict would, compare logits with `reference`.
    Returns (max difference, tolerance, check shape, what ran the check)."""
    if fmt == "hiposeg":
        checkpoint.save({**meta, "state_dict": state_dict}, staged)
    elif fmt == "torch-export":
        write_torch_export(segmenter, meta, staged)
    else:
        write_onnx(segmenter, meta, staged)

    checked_with = fmt
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        run, checked_with = onnx_reference_runner(staged), "onnx.reference (onnxruntime is not installed)"
        check_shape = (1, 3, 65, 81)  # the pure-numpy reference evaluator is slow
    else:
        run = load_inference_model(staged).module
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*check_shape, generator=g)
    with torch.no_grad():
        want = reference(x)
        want = want[0] if isinstance(want, tuple) else want
        got = run(x)
    diff = float((got.float() - want.float()).abs().max()) if got.shape == want.shape else float("inf")
    tolerance = TOLERANCE[fmt] * max(1.0, float(want.abs().max()))
    if not diff <= tolerance:
        what = (f"its logits differ from the training model's by up to {diff:.3g} (tolerance {tolerance:.3g})"
                if got.shape == want.shape else
                f"its output shape {tuple(got.shape)} is not the training model's {tuple(want.shape)}")
        fix = ("Check the disk holding --out and export again" if fmt == "hiposeg" else
               "Export in the hiposeg format instead (it reloads the training module itself)")
        versions = "torch and onnxruntime versions" if fmt == "onnx" else "torch version"
        raise UserError(f"{out} was not written: the exported model failed its check (reloaded, {what})",
                        hint=f"{fix}; if it persists, please report it with your {versions}.")
    return diff, tolerance, tuple(check_shape), checked_with


def build_segmenter_from(payload: dict[str, Any], path: Path) -> nn.Module:
    """The DeepLabV3+ of a `hiposeg` payload with its weights, in eval mode."""
    module = segmenter_from_arch(payload["arch"])
    try:
        module.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{path} does not match its recorded architecture {payload.get('arch')}: {str(e)[:300]}",
                        hint="The file was edited or damaged: export it again from the run's checkpoint.") from None
    return module.eval()


def _example_input() -> tuple[torch.Tensor, dict[str, Any]]:
    """A traced example and the dynamic batch/height/width dims of the program formats."""
    dims = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH),
            2: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
            3: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)}
    return torch.zeros(2, 3, 128, 160), {"x": dims}


def write_torch_export(segmenter: nn.Module, meta: dict[str, Any], out: Path) -> None:
    example, dynamic = _example_input()
    program = torch.export.export(segmenter.eval(), (example,), dynamic_shapes=dynamic)
    meta = {**meta, "container": "torch-export", "input": {**meta["input"], "max_side": MAX_SIDE,
                                                            "max_batch": MAX_BATCH}}
    # Serialised in memory, then written: torch.export.save's zip writer, handed a file whose write
    # fails (a full disk), leaves a writer whose destructor aborts the interpreter at exit.
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_NAME: json.dumps(meta)})
    atomic_write_bytes(out, buffer.getvalue())


def require_onnx_export() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--format onnx needs the optional package(s) {', '.join(missing)}, which are not installed",
                        hint=ONNX_HINT)


def write_onnx(segmenter: nn.Module, meta: dict[str, Any], out: Path) -> None:
    example, dynamic = _example_input()
    # The exporter narrates its passes on stdout and warns about internals; keep the CLI's output ours.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(segmenter.eval(), (example,), dynamo=True, dynamic_shapes=dynamic,
                                    input_names=["image"], output_names=["logits"])
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, json.dumps({**meta, "container": "onnx"})
    atomic_write_bytes(out, proto.SerializeToString())


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
        return "torch-export" if any(n.lower().endswith("/archive_format") for n in names) else "torch"
    if path.suffix.lower() == ".pt2":
        return "torch-export"
    with open(path, "rb") as f:
        first = f.read(1)
    return "onnx" if first == b"\x08" or path.suffix.lower() == ".onnx" else "torch"


def load_inference_model(path: str | Path, prefer: str = "best", device: str | torch.device = "cpu") -> InferenceModel:
    """A run directory, a training checkpoint, or a model exported in any of FORMATS, on `device`."""
    p = rundir.resolve_checkpoint(path, prefer=prefer)
    if p.is_file() and p.stat().st_size == 0:
        raise UserError(f"model file {p} is empty (0 bytes): it was never written completely",
                        hint="Export it again with `hiposeg export`.")
    device = torch.device(device)
    kind = detect_format(p) if p.is_file() else "torch"
    if kind == "torch-export":
        meta, module = _load_torch_export(p, device)
    elif kind == "onnx":
        meta, module = _load_onnx(p, device)
    else:
        obj = checkpoint.load(p, expect=(checkpoint.CHECKPOINT_FORMAT, checkpoint.MODEL_FORMAT))
        kind = "checkpoint" if obj["format"] == checkpoint.CHECKPOINT_FORMAT else "hiposeg"
        payload = model_payload(obj) if kind == "checkpoint" else obj
        meta = {k: v for k, v in payload.items() if k != "state_dict"}
        module = build_segmenter_from(payload, p).to(device)
    try:
        h = Hierarchy.from_dict(meta["hierarchy"])
        norm = meta["normalization"]
        return InferenceModel(module, h, tuple(norm["mean"]), tuple(norm["std"]), tuple(meta["crop"]),
                              Path(meta["data"]) if meta.get("data") else None, source=kind, metadata=meta)
    except (KeyError, TypeError) as e:
        raise UserError(f"{p} lacks the hiposeg metadata it needs (missing {e})",
                        hint="Export the model again with `hiposeg export`.") from None


def _metadata_json(text: str, path: Path) -> Any:
    """The metadata record of a program file (torch-export extra file, ONNX property), nesting bounded."""
    return load_json(text or "null", f"the hiposeg metadata ({METADATA_NAME}) of {path}",
                     hint="Export the model again with `hiposeg export`.")


def _check_metadata(meta: Any, path: Path) -> dict[str, Any]:
    """A program file's metadata record: written by `hiposeg export`, with every field the loaders read."""
    if not isinstance(meta, dict) or meta.get("format") != checkpoint.MODEL_FORMAT:
        raise UserError(f"{path} has no hiposeg metadata ({METADATA_NAME}): it was not written by `hiposeg export`",
                        hint="Export the model with `hiposeg export RUN --format ...`.")
    checkpoint.check_fields(meta, path, checkpoint.ModelMetadata)
    return meta


class BoundedInput(nn.Module):
    """Base of the program adapters: rejects inputs outside the program's shape range with a UserError
    (instead of a guard failure deep inside the runtime), naming the way around it."""

    def __init__(self, min_side: int, max_side: int | None, max_batch: int | None) -> None:
        super().__init__()
        self.min_side, self.max_side, self.max_batch = min_side, max_side, max_batch

    def check(self, x: torch.Tensor) -> None:
        b, _, h, w = x.shape
        if min(h, w) < self.min_side or (self.max_side and max(h, w) > self.max_side):
            raise UserError(f"this exported model takes images of {self.min_side} to {self.max_side or 'any'} pixels "
                            f"per side; got {h}x{w}",
                            hint="Use --mode slide (windows of the training crop), or the hiposeg format.")
        if self.max_batch and b > self.max_batch:
            raise UserError(f"this exported model takes at most {self.max_batch} images per batch; got {b}",
                            hint="Use a smaller --batch-size.")


class ExportedProgramModule(BoundedInput):
    """A torch.export program as a module. The program's own module refuses .train()/.eval() (it is
    frozen in eval mode), so it is kept outside the module tree."""

    def __init__(self, program: Callable[[torch.Tensor], torch.Tensor], meta: dict[str, Any]) -> None:
        inp = meta.get("input", {})
        super().__init__(inp.get("min_side", MIN_SIDE), inp.get("max_side", MAX_SIDE), inp.get("max_batch", MAX_BATCH))
        self._program = [program]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self._program[0](x)


# ------------------------------------------------------------------------------------------
# Proving a torch.export archive plain before torch reads it
# ------------------------------------------------------------------------------------------
# `torch.export.load` is not a data loader. Depending on what the archive says, it unpickles
# (weights/constants marked `use_pickle`, opaque and custom objects, legacy `.pt` payloads, sample
# inputs), dlopens AOTInductor shared libraries (data/aotinductor/), `sympy.sympify`s (= evals)
# every symbolic-shape expression, execs the program's `guards_code`, and writes parameter names
# unescaped into the Python source it generates for `.module()`. So a `.pt2` is loaded only when
# every record torch will read is one `hiposeg export` writes, and every string torch turns into
# code is of the plain form hiposeg's exporter produces. The records are read with torch's own
# reader (`torch._C.PyTorchFileReader`) from the same bytes then handed to torch, so what is judged
# is what torch loads: torch matches entry names case-insensitively and, for a name stored twice,
# reads whichever copy its binary search meets, where Python's `zipfile` reads the last one.

# The records of a hiposeg program, below the archive's root folder (model name: "model").
PROGRAM_JSON, SAMPLE_INPUTS = "models/model.json", "data/sample_inputs/model.pt"
# weight / constant table -> the file-name prefix of its raw tensor records
PAYLOAD_CONFIGS = {"data/weights/model_weights_config.json": "weight_",
                   "data/constants/model_constants_config.json": "tensor_"}
PROGRAM_RECORD = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                            r"|models/model\.json|data/sample_inputs/model\.pt|extra/hiposeg\.json"
                            r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
                            r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+")
REQUIRED_RECORDS = ("archive_format", "archive_version", ".data/version", PROGRAM_JSON, SAMPLE_INPUTS,
                    f"extra/{METADATA_NAME}", *PAYLOAD_CONFIGS)
# The operators of every DeepLabV3+ program hiposeg exports (ResNet-18/50/101, output stride 8 and 16).
PROGRAM_OPS = frozenset({
    "torch.ops.aten.conv2d.default", "torch.ops.aten.batch_norm.default", "torch.ops.aten.relu.default",
    "torch.ops.aten.relu_.default", "torch.ops.aten.add_.Tensor", "torch.ops.aten.max_pool2d.default",
    "torch.ops.aten.adaptive_avg_pool2d.default", "torch.ops.aten.dropout.default", "torch.ops.aten.cat.default",
    "torch.ops.aten.upsample_bilinear2d.vec", "torch.ops.aten.sym_size.int", "_operator.add", "_operator.floordiv",
})
# Program fields torch keeps as text (never resolved, parsed as code or written into generated code).
TEXT_FIELDS = frozenset({"stack_trace", "nn_module_stack", "torch_fn", "torch_version"})
TREESPEC_FIELDS = frozenset({"in_spec", "out_spec"})
TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})
# Every other string (names of tensors, parameters, modules, symbols, dict keys) is a plain dotted name.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]*")
# Symbolic shapes, as torch writes them (sympy srepr): Add(FloorDiv(Symbol('s0', positive=True,
# integer=True), Integer(16)), Integer(1)). Nothing else reaches sympify's eval.
SYM_FUNCTIONS = frozenset({"Add", "Mul", "FloorDiv", "CeilDiv", "Mod", "Max", "Min",
                           "Eq", "Ne", "Lt", "Le", "Gt", "Ge"})
SYMBOL_ASSUMPTIONS = frozenset({"positive", "nonnegative", "integer", "real", "finite"})
SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")
MAX_SYM_EXPR = 2000


def program_refusal(path: Path, why: str) -> UserError:
    return UserError(f"refusing to load {path}: {why}",
                     hint="hiposeg programs hold plain tensors and a plain graph only. Do not load files from "
                          "untrusted sources; export the model again with `hiposeg export --format torch-export`.")


def read_program_archive(path: Path) -> bytes:
    """The bytes of `path` once proven to hold nothing torch.export.load would run, or a UserError.
    The caller hands these very bytes to torch (no second read of the file)."""
    data = path.read_bytes()
    reader = _program_reader(data, path)

    def record(name: str) -> bytes:
        return _reading(path, lambda: reader.get_record(name))

    records = _checked_record_names(_reading(path, reader.get_all_records), _zip_names(data, path), path)
    for config, prefix in PAYLOAD_CONFIGS.items():
        _check_payload_config(_program_json(record(config), config, path), config, prefix, records, path)
    _check_sample_inputs(record(SAMPLE_INPUTS), path)
    _check_program(_program_json(record(PROGRAM_JSON), PROGRAM_JSON, path), path)
    return data


def _reading(path: Path, read: Callable[[], Any]) -> Any:
    """A call into torch's archive reader; its failures (a damaged or malformed archive) as a UserError."""
    try:
        return read()
    except RuntimeError as e:
        raise _invalid_archive(path, e) from None


def _invalid_archive(path: Path, e: Exception) -> UserError:
    return UserError(f"{path} is not a valid torch.export archive ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                     hint="Export the model again with `hiposeg export --format torch-export`.")


def _zip_names(data: bytes, path: Path) -> list[str]:
    """The entry names as Python's zipfile reads them (the central directory)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise _invalid_archive(path, e) from None


def _program_reader(data: bytes, path: Path) -> Any:
    """torch's own archive reader (the one torch.export.load uses), over `data`."""
    return _reading(path, lambda: torch._C.PyTorchFileReader(io.BytesIO(data)))


def _checked_record_names(records: list[str], zip_names: list[str], path: Path) -> set[str]:
    """Refuse any archive whose entries Python and torch could read differently (names that differ
    between the two readers, a name stored twice, names equal but for case) or that holds a record
    hiposeg never writes (AOTInductor libraries, pickled objects, legacy payloads, ...)."""
    root = zip_names[0].split("/")[0] if zip_names else ""
    if zip_names != [f"{root}/{r}" for r in records]:
        raise program_refusal(path, "Python's zip reader and torch's list different entries (a crafted archive)")
    _refuse_ambiguous_names(records, path)
    for name in records:
        if not PROGRAM_RECORD.fullmatch(name):
            what = " (AOTInductor native code)" if name.lower().startswith("data/aotinductor/") else ""
            raise program_refusal(path, f"it holds the entry {name[:80]!r}{what}, which hiposeg programs never contain")
    missing = [r for r in REQUIRED_RECORDS if r not in records]
    if missing:
        raise _invalid_archive(path, ValueError(f"missing {', '.join(missing)}"))
    return set(records)


def _refuse_ambiguous_names(records: list[str], path: Path) -> None:
    """Names that torch could resolve to another entry than the one judged: the same name twice, or
    names equal but for case (torch's zip reader, miniz, looks names up case-insensitively)."""
    seen: dict[str, str] = {}
    for name in records:
        other = seen.get(name.lower())
        if other is None:
            seen[name.lower()] = name
        elif other == name:
            raise program_refusal(path, f"it stores the entry {name[:80]!r} twice (torch reads one copy, Python's "
                                        "zipfile the other)")
        else:
            raise program_refusal(path, f"its entries {other[:80]!r} and {name[:80]!r} differ only in case (torch "
                                        "looks names up without regard to case, so it may read either)")


def _program_json(data: bytes, record: str, path: Path) -> Any:
    return load_json(data, f"{path} (record {record})",
                     hint="Export the model again with `hiposeg export --format torch-export`.")


def _check_payload_config(config: Any, record: str, prefix: str, records: set[str], path: Path) -> None:
    """Every weight / constant is a raw tensor record (no pickle, no opaque or custom object)."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise program_refusal(path, f"its {record} is not a table of tensors")
    folder = record.rsplit("/", 1)[0]
    for fqn, entry in entries.items():
        file = entry.get("path_name") if isinstance(entry, dict) else None
        plain = (isinstance(file, str) and re.fullmatch(re.escape(prefix) + r"\d+", file) is not None
                 and f"{folder}/{file}" in records and entry.get("use_pickle") is False
                 and isinstance(entry.get("tensor_meta"), dict))
        if not plain:
            raise program_refusal(path, f"its entry {fqn[:80]!r} in {record} is not a plain tensor: torch would "
                                        "unpickle it as an arbitrary Python object")
    _check_strings(config, record, path)


def _check_sample_inputs(data: bytes, path: Path) -> None:
    """The traced example: one image batch, loadable without unpickling any Python object."""
    import pickle

    try:
        inputs = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise program_refusal(path, f"its sample inputs ({SAMPLE_INPUTS}) contain pickled Python objects that only "
                                    "unsafe unpickling could restore") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise _invalid_archive(path, e) from None
    args, kwargs = inputs if isinstance(inputs, tuple) and len(inputs) == 2 else (None, None)
    if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], torch.Tensor) and kwargs == {}):
        raise program_refusal(path, f"its sample inputs ({SAMPLE_INPUTS}) are not one image batch")


def _check_program(program: Any, path: Path) -> None:
    """The serialized program (models/model.json): no guard code, only hiposeg's operators, and
    every string torch resolves, evaluates or writes into code of the plain form."""
    if not isinstance(program, dict):
        raise program_refusal(path, f"its {PROGRAM_JSON} is not a serialized program")
    if program.get("guards_code"):
        raise program_refusal(path, "it carries guard code, which torch would run as Python")
    _check_strings(program, PROGRAM_JSON, path)


def _check_strings(data: Any, record: str, path: Path) -> None:
    for field, text in _strings(data):
        why = _unplain_string(field, text)
        if why:
            raise program_refusal(path, f"{why} in {record}")


def _strings(data: Any) -> Iterator[tuple[str, str]]:
    """(field, text) for every string in parsed JSON: a dict key under the field "", a list item
    under its list's field. Iterative: the nesting was bounded by load_json."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                yield "", key
                stack.append((key, item))
        elif isinstance(value, list):
            stack.extend((field, item) for item in value)
        elif isinstance(value, str):
            yield field, value


def _unplain_string(field: str, text: str) -> str | None:
    """Why this program string is not plain (None when it is)."""
    if field in ("target", "as_operator"):
        return None if text in PROGRAM_OPS else f"it calls {text[:80]!r}, not an operator of a hiposeg program,"
    if field == "expr_str":
        return None if _plain_sym_expr(text) else \
            f"its symbolic shape {text[:80]!r}, which sympy would evaluate as Python,"
    if field in TREESPEC_FIELDS:
        return None if _plain_treespec(text) else f"its {field} names types other than tuples, lists and dicts"
    if field in TEXT_FIELDS:
        return None if all(c == "\n" or c.isprintable() for c in text) else f"its {field} holds control characters"
    if PLAIN_NAME.fullmatch(text):
        return None
    return f"its {field or 'key'} {text[:80]!r} is not a plain name (torch would write it into generated Python code)"


def _plain_sym_expr(text: str) -> bool:
    """A sympy srepr of integer arithmetic on shape symbols (what torch.export writes); anything
    else would run through sympify's eval."""
    if len(text) > MAX_SYM_EXPR:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return _plain_sym_node(tree.body)


def _plain_sym_node(node: ast.expr) -> bool:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return False
    name, args, keywords = node.func.id, node.args, node.keywords
    if name == "Symbol":
        return (len(args) == 1 and _constant_of(args[0], str) and SYMBOL_NAME.fullmatch(args[0].value) is not None
                and all(k.arg in SYMBOL_ASSUMPTIONS and _constant_of(k.value, bool) for k in keywords))
    if name == "Integer":
        arg = args[0] if len(args) == 1 else None
        if isinstance(arg, ast.UnaryOp) and isinstance(arg.op, ast.USub):
            arg = arg.operand
        return not keywords and _constant_of(arg, int)
    return name in SYM_FUNCTIONS and not keywords and bool(args) and all(_plain_sym_node(a) for a in args)


def _constant_of(node: ast.expr | None, kind: type) -> bool:
    """A literal of exactly this type (True is not an int here)."""
    return isinstance(node, ast.Constant) and type(node.value) is kind


def _plain_treespec(text: str) -> bool:
    """A pytree spec (JSON) of tuples, lists, dicts and leaves: no other type is looked up."""
    try:
        spec = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    stack = [spec]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if "type" in value and value["type"] not in TREESPEC_TYPES:
                return False
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return True


@contextlib.contextmanager
def _weights_only_loads():
    """Force every `torch.load` inside (including torch.export's own fallbacks) to weights_only=True."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _load_torch_export(path: Path, device: torch.device) -> tuple[dict[str, Any], nn.Module]:
    import pickle

    extra = {METADATA_NAME: ""}
    data = read_program_archive(path)
    try:
        with _weights_only_loads():  # a second line of defence behind read_program_archive
            program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except pickle.UnpicklingError:
        raise program_refusal(path, "it contains pickled Python objects that only unsafe unpickling could "
                                    "restore") from None
    except Exception as e:  # noqa: BLE001 - any failure of the archive reader means the same to the user
        raise UserError(f"cannot load torch.export program {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        hint="The file is damaged or from an incompatible PyTorch version: export it again "
                             "(the hiposeg format is the portable one).") from None
    meta = _check_metadata(_metadata_json(extra[METADATA_NAME], path), path)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return meta, ExportedProgramModule(program.module(), meta)


class OnnxRuntimeModule(BoundedInput):
    """An ONNX Runtime session as a module: torch in, torch out (on the input's device)."""

    def __init__(self, session: Any, meta: dict[str, Any]) -> None:
        super().__init__(meta.get("input", {}).get("min_side", MIN_SIDE), None, None)
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def _read_onnx_metadata(path: Path) -> tuple[Any, dict[str, Any]]:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)  # never read files the model names
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have many types
        raise UserError(f"cannot read ONNX model {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        hint="The file is damaged: export it again with `hiposeg export --format onnx`.") from None
    _refuse_external_data(proto, path)
    props = {p.key: p.value for p in proto.metadata_props}
    return proto, _check_metadata(_metadata_json(props.get(METADATA_NAME, ""), path), path)


def _refuse_external_data(proto: Any, path: Path) -> None:
    """hiposeg writes every ONNX tensor inline. A tensor stored "externally" names a file to read: onnx
    reads it from beside the model, onnxruntime (given the model as bytes) from the working directory."""
    for name in _external_tensors(proto):
        raise UserError(f"refusing to load {path}: its tensor {name!r} is stored in an external file, which "
                        "hiposeg models never use (the file it names would be read as weights)",
                        hint="Export the model again with `hiposeg export --format onnx`; do not load files from "
                             "untrusted sources.")


def _external_tensors(proto: Any) -> Iterator[str]:
    from onnx import TensorProto

    for t in _all_tensors(proto):
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            yield t.name


def _all_tensors(proto: Any) -> Iterator[Any]:
    """Every TensorProto of a ModelProto: initializers, sparse initializers and node attributes of
    its graph, of every subgraph, and of its local functions."""
    graphs, nodes = [proto.graph], [n for f in proto.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for sparse in g.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            nodes.extend(g.node)
            continue
        for a in nodes.pop().attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sparse in [*([a.sparse_tensor] if a.HasField("sparse_tensor") else []), *a.sparse_tensors]:
                yield from (sparse.values, sparse.indices)
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)


def _load_onnx(path: Path, device: torch.device) -> tuple[dict[str, Any], nn.Module]:
    def require(package: str) -> None:
        if importlib.util.find_spec(package) is None:
            raise UserError(f"running the ONNX model {path} needs the optional package {package}",
                            hint=ONNX_HINT + " Or export the run in the hiposeg / torch-export format.")

    require("onnx")
    proto, meta = _read_onnx_metadata(path)  # a damaged file is reported as such, with or without a runtime
    require("onnxruntime")
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(f"--device cuda: this onnxruntime has no CUDA provider ({ort.get_available_providers()})",
                            hint="Install onnxruntime-gpu, or use --device cpu.")
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(proto.SerializeToString(), providers=providers)
    return meta, OnnxRuntimeModule(session, meta)


def onnx_reference_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX's own pure-numpy reference evaluator: slow, but an independent implementation of the
    operators' semantics, so it checks the exported graph where onnxruntime is not installed."""
    from onnx.reference import ReferenceEvaluator

    proto, _ = _read_onnx_metadata(path)
    evaluator = ReferenceEvaluator(proto)
    name = proto.graph.input[0].name
    return lambda x: torch.from_numpy(np.asarray(evaluator.run(None, {name: x.numpy()})[0]))
