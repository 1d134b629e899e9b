"""Checkpoints of plain data, written atomically and read only with `torch.load(weights_only=True)`.

A training checkpoint (`make_checkpoint`) is a dict of tensors, numbers, strings, lists and dicts:

    format, hiposeg_version, torch_version, run_id, iteration (completed), config (TrainConfig as
    JSON data), hierarchy (normalised dict) + hierarchy_sha256, model (segmenter state dict),
    projection (head state dict or {}), aux_head (auxiliary head state dict or {}; absent from
    checkpoints written before it existed), memory (prototype buffers), optimizer, scaler, rng
    (`rng_state`), best, last_eval

Nothing in it needs pickle's code execution, so loading refuses any file that would (a
`__reduce__` payload, a pickled class) before running a byte of it. A file with the right format tag
must also hold every field its readers use, with the right types (`check_fields`): a damaged or
edited file is a UserError naming the field, never a KeyError from deep inside resume or export.
Whether a checkpoint fits the data and configuration it is resumed with is `check_compatible`;
`check_same_hierarchy` compares a trained model's hierarchy with the data's, for every command
that needs it.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hiposeg import __version__
from hiposeg.archive import check_torch_file
from hiposeg.atomic import atomic_save
from hiposeg.config import DEFAULT_FAMILY, MIN_CROP, ModelConfig, TrainConfig, format_validation_error, upgrade_config
from hiposeg.data.codecs import BadFile, open_regular
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy

CHECKPOINT_FORMAT = "hiposeg-checkpoint/1"
MODEL_FORMAT = "hiposeg-model/1"
UNSAFE_HINT = ("hiposeg files hold plain data only. Do not load files from untrusted sources; re-export or re-save "
               "the checkpoint with hiposeg.")
DAMAGED_HINT = ("The file was damaged or edited: use the run's other checkpoint (best.pt / last.pt), export the "
                "model again, or retrain.")

# ==========================================================================================
# The fields each format's readers use (strict types: no coercion; other fields are allowed)
# ==========================================================================================

Tensor = torch.Tensor
StateDict = dict[str, Tensor]
OutputStride = ModelConfig.model_fields["output_stride"].annotation


class _Fields(BaseModel):
    model_config = ConfigDict(strict=True, arbitrary_types_allowed=True, extra="allow")


class BestFields(_Fields):
    metric: str
    value: float | None
    iteration: int | None


class NumpyRngFields(_Fields):
    keys: Tensor
    pos: int
    has_gauss: int
    gauss: float


class PythonRngFields(_Fields):
    version: int
    state: list[int]
    gauss: float | None


class RngFields(_Fields):
    torch: Tensor
    cuda: list[Tensor]
    numpy: NumpyRngFields
    python: PythonRngFields


class ParamGroupFields(_Fields):
    params: list[int]
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool


class OptimizerFields(_Fields):
    """torch.optim.SGD's state dict."""

    state: dict[int, dict[str, Tensor | None]]
    param_groups: list[ParamGroupFields]


class ScalerFields(_Fields):
    """torch.amp.GradScaler's state dict: empty when mixed precision is off."""

    scale: float | None = None
    growth_factor: float | None = None
    backoff_factor: float | None = None
    growth_interval: int | None = None
    growth_tracker: int | None = Field(None, alias="_growth_tracker")


class CheckpointFields(_Fields):
    """A training checkpoint (`make_checkpoint`), as resume, export, eval and predict read it."""

    iteration: int = Field(ge=0)
    config: dict[str, Any]
    hierarchy: dict[str, Any]
    hierarchy_sha256: str
    model: StateDict
    projection: StateDict
    aux_head: StateDict = Field(default_factory=dict)
    memory: StateDict
    optimizer: OptimizerFields
    scaler: ScalerFields
    rng: RngFields
    best: BestFields
    last_eval: dict[str, float | None] | None = None


class ArchFields(_Fields):
    """The family (absent from files exported while DeepLabV3+ was the only one), its variant and the
    family's other architecture fields, checked by the model configuration's own rules."""

    name: str = DEFAULT_FAMILY
    backbone: str
    output_stride: OutputStride | None = None  # type: ignore[valid-type]
    num_classes: int = Field(ge=1)
    # absent from files exported before the separable DeepLabV3+: the family's `check_arch` names them
    decoder_channels: int | None = Field(None, ge=8)
    head: str | None = None

    _known_family = field_validator("name")(ModelConfig._known_family.__func__)
    _variant_of_family = field_validator("backbone")(ModelConfig._variant_of_family.__func__)


class NormalizationFields(_Fields):
    """(x - mean) / std on every input: a zero or non-finite value would make every input NaN."""

    mean: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(min_length=3, max_length=3)
    std: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(min_length=3, max_length=3)


class InputFields(_Fields):
    min_side: int = Field(ge=1)
    multiple: int = Field(1, ge=1)  # programs of some families take sides that are multiples of it
    max_side: int | None = None
    max_batch: int | None = None


class ModelMetadata(_Fields):
    """The metadata record of an exported model (`export.model_metadata`), in every format."""

    arch: ArchFields
    hierarchy: dict[str, Any]
    normalization: NormalizationFields
    crop: list[int] = Field(min_length=2, max_length=2)
    data: str | None = None
    input: InputFields


class ModelFields(ModelMetadata):
    """An exported model in the hiposeg format: the metadata plus the segmenter's weights."""

    state_dict: StateDict


FIELDS: dict[str, type[_Fields]] = {CHECKPOINT_FORMAT: CheckpointFields, MODEL_FORMAT: ModelFields}


def check_fields(obj: dict[str, Any], path: Path, fields: type[_Fields] | None = None) -> None:
    """Refuse a file whose format tag is right but which lacks a field its readers use, or holds one
    of the wrong type, naming the field; the training configuration and the hierarchy it carries
    are validated by their own models."""
    fields = fields or FIELDS[obj["format"]]
    try:
        fields.model_validate(obj)
    except ValidationError as e:
        raise UserError(_field_error(path, fields, e), hint=DAMAGED_HINT) from None
    if fields is CheckpointFields:
        try:
            TrainConfig.model_validate(obj["config"])
        except ValidationError as e:
            raise UserError(f"{path} has a malformed field 'config':\n{format_validation_error(e)}",
                            hint=DAMAGED_HINT) from None
    try:
        hierarchy = Hierarchy.from_dict(obj["hierarchy"], path)
    except UserError as e:
        raise UserError(f"{path} has a malformed field 'hierarchy': {e.message}", hint=DAMAGED_HINT) from None
    if issubclass(fields, ModelMetadata) and obj["arch"]["num_classes"] != hierarchy.num_fine:
        raise UserError(f"{path} has a malformed field 'arch.num_classes': {obj['arch']['num_classes']}, but its "
                        f"hierarchy has {hierarchy.num_fine} fine classes", hint=DAMAGED_HINT)
    if issubclass(fields, ModelMetadata):
        check_crop(obj, path)


def check_crop(meta: dict[str, Any], path: Path) -> None:
    """The training crop is the sliding window of inference: a program (which refuses inputs below its
    `input.min_side`) needs windows at least that large, the hiposeg format the smallest training crop;
    none may exceed the largest input a program takes (a window of 1 px would mean millions of passes,
    one of 0 px or of 10^6 px a failure deep inside torch)."""
    from hiposeg.export.common import MAX_SIDE

    low = meta["input"]["min_side"] if meta.get("container") else MIN_CROP
    high = meta["input"].get("max_side") or MAX_SIDE
    if not all(low <= side <= high for side in meta["crop"]):
        raise UserError(f"{path} has a malformed field 'crop': {meta['crop']}, but the sliding windows of this model "
                        f"must be {low} to {high} pixels per side", hint=DAMAGED_HINT)


def restore(path: Path, field: str, load: Callable[[], Any]) -> None:
    """Restore one field of a loaded file into live objects (`load_state_dict`, RNG state). Values of
    the right types that do not fit (other shapes, parameter groups or RNG sizes) are a UserError
    naming the file and the field, not a traceback from inside torch."""
    try:
        load()
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path}: its field {field!r} does not fit the model it belongs to "
                        f"({str(e).strip().splitlines()[0][:200]})", hint=DAMAGED_HINT) from None


def _field_error(path: Path, fields: type[_Fields], e: ValidationError) -> str:
    """One line naming the first bad field (dotted path), what is wrong, and how many more there are."""
    errors = e.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more field problem(s))" if len(errors) > 1 else ""
    fmt = MODEL_FORMAT if issubclass(fields, ModelMetadata) else CHECKPOINT_FORMAT
    if first["type"] == "missing":
        return f"{path} lacks the field {where!r}, which every {fmt} file holds{more}"
    got = first.get("input")
    shown = type(got).__name__ if isinstance(got, (dict, list, tuple, Tensor)) else repr(got)[:60]
    return f"{path} has a malformed field {where!r}: {first['msg'].lower()} (got {shown}){more}"


def save(obj: dict[str, Any], path: Path) -> None:
    """torch.save into a temp file, fsync, rename: the previous file survives any failure."""
    try:
        atomic_save(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:
        cause = write_error(e)
        if cause is None:  # not an I/O failure: a bug, keep the traceback
            raise
        raise UserError(f"could not write checkpoint {path}: {cause.strerror or cause}",
                        hint="The previous checkpoint (if any) is intact. Free disk space or choose another --out, "
                             "then resume with --resume.") from None


def write_error(e: BaseException | None) -> OSError | None:
    """The OSError behind a failed write, if any. torch.save's zip writer turns an exception from
    the file's `write()` (e.g. ENOSPC on a full disk) into a RuntimeError ("unexpected pos ...")
    and keeps the OSError only as its `__context__`."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def load(path: str | os.PathLike, *, expect: str | tuple[str, ...] = (CHECKPOINT_FORMAT,),
         map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a hiposeg file safely; every failure is a UserError naming the file and the cause."""
    path = Path(path)
    expect = (expect,) if isinstance(expect, str) else expect
    obj = _read(path, expect, map_location)
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt not in expect:
        raise UserError(f"{path} is not a {' or '.join(expect)} file (format: {fmt!r})",
                        hint="Pass a checkpoint written by `hiposeg train` or a model written by `hiposeg export`.")
    if fmt == CHECKPOINT_FORMAT and "config" in obj:  # a config saved before a field was renamed
        obj["config"] = upgrade_config(obj["config"], f"checkpoint {path}")
    check_fields(obj, path)
    return obj


def _read(path: Path, expect: tuple[str, ...], map_location: str | torch.device, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` of a regular file whose archive was proven before (every entry
    stored, read alike by Python and torch: `hiposeg.archive`), so loading costs at most its size."""
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a checkpoint file",
                        hint="Pass a run directory only where the command accepts one (eval, export, --resume).")
    try:
        f = open_regular(path)
    except (BadFile, OSError) as e:
        why = e.reason if isinstance(e, BadFile) else e.strerror or str(e)
        raise UserError(f"cannot read checkpoint {path}: {why}", hint="Pass the checkpoint file itself.") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise UserError(f"checkpoint {path} is empty (0 bytes): it was never written completely",
                            hint="Use another checkpoint (e.g. the run's best.pt / last.pt) or retrain.")
        refuse_program(path, expect)
        check_torch_file(f, size, lambda why: UserError(f"refusing to load {path}: {why}", hint=UNSAFE_HINT),
                         lambda e: _corrupt(path, e))
        try:
            return torch.load(str(path) if mmap else f, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise UserError(f"refusing to load {path}: it contains Python objects that only unsafe unpickling could "
                            f"restore ({str(e).splitlines()[0][:200]})", hint=UNSAFE_HINT) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise _corrupt(path, e) from None


def _corrupt(path: Path, e: Exception) -> UserError:
    return UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})",
                     hint="Use the run's other checkpoint (best.pt / last.pt) or retrain.")


def peek(path: Path) -> dict[str, Any]:
    """A checkpoint read memory-mapped (its tensors stay on disk): its config, hierarchy, run id and
    iteration for the checks made before a run loads it."""
    ck = _read(Path(path), (CHECKPOINT_FORMAT,), "cpu", mmap=True)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        ck = load(path)  # explains what the file is instead
    return ck


def summary(path: Path) -> dict[str, Any]:
    """A checkpoint's run id and iteration (`peek`)."""
    ck = peek(path)
    return {"run_id": ck.get("run_id"), "iteration": ck.get("iteration")}


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a hiposeg training checkpoint (read as `summary` reads it; any failure: no)."""
    if not path.is_file():
        return False
    try:
        ck = _read(path, (CHECKPOINT_FORMAT,), "cpu", mmap=True)
    except UserError:
        return False
    return isinstance(ck, dict) and ck.get("format") == CHECKPOINT_FORMAT


def refuse_program(path: Path, expect: tuple[str, ...]) -> None:
    """A torch.export or ONNX program where a checkpoint is expected (e.g. one renamed to a run's
    checkpoints/best.pt, or given to `export` or `--resume`) is named as such before torch reads it."""
    from hiposeg.export import detect_format

    kind = detect_format(path)
    if kind != "torch":
        raise UserError(f"{path} is a {kind} program, not a {' or '.join(expect)} file",
                        hint="Pass the run directory or the checkpoint written by `hiposeg train` (eval and predict "
                             "also take exported programs; export and --resume do not).")


# ==========================================================================================
# A training checkpoint: what it holds, and restoring it into a run
# ==========================================================================================


def make_checkpoint(cfg: TrainConfig, hierarchy: Hierarchy, net: torch.nn.Module, criterion: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *, iteration: int,
                    best: dict[str, Any], last_eval: dict[str, Any] | None, run_id: str) -> dict[str, Any]:
    """Everything an exact resume needs (`net` is the HiPoSegNet training wrapper, `criterion` the
    module holding the prototype memory), and what export takes from it."""
    return {
        "format": CHECKPOINT_FORMAT,
        "hiposeg_version": __version__,
        "torch_version": str(torch.__version__),
        "run_id": run_id,
        "iteration": iteration,
        "config": cfg.to_plain(),
        "hierarchy": hierarchy.to_dict(),
        "hierarchy_sha256": hierarchy.sha256,
        "model": net.segmenter.state_dict(),
        "projection": net.projection.state_dict() if net.projection is not None else {},
        "aux_head": net.aux_head.state_dict() if net.aux_head is not None else {},
        "memory": criterion.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "best": best,
        "last_eval": last_eval,
    }


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, NumPy and Python generators' states as plain data (`RngFields`)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def check_same_hierarchy(model: str, trained_name: str, trained_sha256: str, data: Hierarchy, data_root: str | Path,
                         hint: str) -> None:
    """The hierarchy-compatibility check (for `--resume`, and `eval` of a model on a dataset): a model
    trained on one class tree is refused on data of another, naming both (two hierarchies of the same
    name can differ: the digests tell them apart)."""
    if trained_sha256 != data.sha256:
        raise UserError(f"{model} was trained with hierarchy {trained_name!r} (sha256 {str(trained_sha256)[:12]}), "
                        f"but {data_root} uses {data.name!r} ({data.sha256[:12]}): a different class tree", hint=hint)


def check_compatible(ckpt: dict[str, Any], path: Path, hierarchy: Hierarchy, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint of another hierarchy or architecture, saying which."""
    check_same_hierarchy(f"checkpoint {path}", ckpt.get("hierarchy", {}).get("name", "?"),
                         ckpt.get("hierarchy_sha256"), hierarchy, cfg.data.resolved_root(),
                         hint="Resume with the dataset the run was trained on, or start a new run.")
    theirs_model = ModelConfig.model_validate(ckpt["config"].get("model", {}))  # fields it predates: defaults
    for key in ("name", "backbone", "output_stride", "decoder_channels", "embed_dim", "embed_source", "aux_head"):
        if getattr(theirs_model, key) != getattr(cfg.model, key):
            raise UserError(f"checkpoint {path} has model.{key}={getattr(theirs_model, key)!r}, but the configuration "
                            f"asks for {getattr(cfg.model, key)!r}",
                            hint="Resume with the run's own configuration (drop the conflicting flag).")


def restore_model(ckpt: dict[str, Any], path: Path, net: torch.nn.Module, criterion: torch.nn.Module) -> None:
    """The segmenter, projection head, auxiliary head and prototype memory of a checkpoint, each checked to fit."""
    restore_segmenter(ckpt, path, net.segmenter)
    if net.projection is not None:
        restore(path, "projection", lambda: net.projection.load_state_dict(ckpt["projection"]))
    if net.aux_head is not None:
        restore(path, "aux_head", lambda: net.aux_head.load_state_dict(ckpt["aux_head"]))
    restore(path, "memory", lambda: criterion.load_state_dict(ckpt["memory"]))


def restore_segmenter(ckpt: dict[str, Any], path: Path, segmenter: Any) -> None:
    """The checkpoint's "model" entry into `segmenter` (a `models.Segmenter`): weights of an architecture
    the family no longer builds are refused by name (`Segmenter.check_weights`), a misfit named as the field."""
    segmenter.check_weights(ckpt["model"], path)
    restore(path, "model", lambda: segmenter.load_state_dict(ckpt["model"]))


def restore_optimizer(ckpt: dict[str, Any], path: Path, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler) -> None:
    restore(path, "optimizer", lambda: load_optimizer_state(optimizer, ckpt["optimizer"]))
    restore(path, "scaler", lambda: scaler.load_state_dict(ckpt["scaler"]))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict`, which does not compare the buffers' shapes with the parameters'
    (a mismatch would fail only at the first step, deep inside SGD)."""
    optimizer.load_state_dict(state)
    for param, buffers in optimizer.state.items():
        for name, value in buffers.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise ValueError(f"{name} of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}")
