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

import contextlib
import importlib.util
import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hiposeg import __version__, checkpoint
from hiposeg.config import TrainConfig
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.io import TMP_PREFIX, atomic_write_bytes

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


def training_model(ckpt: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """(HiPoSegNet with its projection head, criterion with its prototype memory), as trained."""
    from hiposeg.engine import build_model

    cfg = TrainConfig.model_validate(ckpt["config"])
    net, criterion = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": None})}),
                                 Hierarchy.from_dict(ckpt["hierarchy"]))
    net.segmenter.load_state_dict(ckpt["model"])
    if net.projection is not None:
        net.projection.load_state_dict(ckpt["projection"])
    criterion.load_state_dict(ckpt["memory"])
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
    src = checkpoint.resolve(source, prefer=prefer)
    obj = checkpoint.load(src, expect=(checkpoint.CHECKPOINT_FORMAT, checkpoint.MODEL_FORMAT))
    if obj["format"] == checkpoint.CHECKPOINT_FORMAT:
        meta = model_metadata(obj)
        reference, criterion = training_model(obj)
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
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        return "torch-export" if any(n.endswith("/archive_format") for n in names) else "torch"
    if path.suffix.lower() == ".pt2":
        return "torch-export"
    with open(path, "rb") as f:
        first = f.read(1)
    return "onnx" if first == b"\x08" or path.suffix.lower() == ".onnx" else "torch"


def load_inference_model(path: str | Path, prefer: str = "best", device: str | torch.device = "cpu") -> InferenceModel:
    """A run directory, a training checkpoint, or a model exported in any of FORMATS, on `device`."""
    p = checkpoint.resolve(path, prefer=prefer)
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


def _check_metadata(meta: Any, path: Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != checkpoint.MODEL_FORMAT:
        raise UserError(f"{path} has no hiposeg metadata ({METADATA_NAME}): it was not written by `hiposeg export`",
                        hint="Export the model with `hiposeg export RUN --format ...`.")
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


def check_program_archive(path: Path) -> None:
    """Refuse a .pt2 whose loading would unpickle arbitrary Python objects, before torch reads it.

    `torch.export.load` unpickles with `weights_only=False` in several places: weights and tensor
    constants stored with `use_pickle`, legacy `.pt` weight/constant payloads, the sample inputs when a
    safe load fails, and `pickle.loads` / TorchScript unpickling for opaque and custom-object
    constants. `hiposeg export` writes none of those, so an archive that has them is refused; the
    remaining `torch.load` calls are forced to weights-only while loading (`_weights_only_loads`).
    """
    from torch.export.pt2_archive import constants as pt2

    unsafe_prefixes = (pt2.CUSTOM_OBJ_FILENAME_PREFIX, pt2.OPAQUE_OBJ_FILENAME_PREFIX)
    refusal = f"refusing to load {path}: "
    hint = "hiposeg programs hold plain tensors only. Do not load files from untrusted sources; export the model again."
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if "/data/weights/" in name or "/data/constants/" in name:
                    if name.endswith(".pt"):
                        raise UserError(refusal + f"it stores pickled (legacy) payloads ({name})", hint=hint)
                    if name.endswith("_config.json"):
                        entries = json.loads(zf.read(name)).get("config", {})
                        for fqn, entry in entries.items():
                            if entry.get("use_pickle") or str(entry.get("path_name", "")).startswith(unsafe_prefixes):
                                raise UserError(refusal + f"its entry {fqn!r} in {name} would be unpickled as an "
                                                "arbitrary Python object", hint=hint)
    except (zipfile.BadZipFile, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{path} is not a valid torch.export archive ({type(e).__name__}: {str(e)[:120]})",
                        hint="Export the model again with `hiposeg export --format torch-export`.") from None


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
    check_program_archive(path)
    try:
        with open(path, "rb") as f, _weights_only_loads():  # a file object: torch warns about names not ending in .pt2
            program = torch.export.load(f, extra_files=extra)
    except pickle.UnpicklingError:
        raise UserError(f"refusing to load {path}: it contains pickled Python objects (e.g. in its sample inputs) "
                        "that only unsafe unpickling could restore",
                        hint="hiposeg programs hold plain tensors only. Do not load files from untrusted sources; "
                             "export the model again.") from None
    except Exception as e:  # noqa: BLE001 - any failure of the archive reader means the same to the user
        raise UserError(f"cannot load torch.export program {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        hint="The file is damaged or from an incompatible PyTorch version: export it again "
                             "(the hiposeg format is the portable one).") from None
    try:
        meta = _check_metadata(json.loads(extra[METADATA_NAME] or "null"), path)
    except json.JSONDecodeError:
        meta = _check_metadata(None, path)
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
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have many types
        raise UserError(f"cannot read ONNX model {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        hint="The file is damaged: export it again with `hiposeg export --format onnx`.") from None
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        meta = json.loads(props.get(METADATA_NAME, "null"))
    except json.JSONDecodeError:
        meta = None
    return proto, _check_metadata(meta, path)


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
