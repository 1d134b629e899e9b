"""Run configuration: Pydantic models validated at the edges, the paper's dataset recipes, and the
loss-term vocabulary (which terms exist, which prototype level each reads, the phases of the
sequential schedule), defined and validated here once for the loss module, the CLI and `ablate`.

A resolved `TrainConfig` is saved as `config.yaml` in every run directory and inside every
checkpoint (as plain JSON-compatible data), so a run can be reproduced and resumed exactly.
Overrides come, in increasing priority, from: the dataset recipe, `--config FILE`, the named CLI
flags, and `--set key=value`. Renamed fields (`RENAMED`) are still read, with a deprecation note.
"""

from __future__ import annotations

import math
import os
import reprlib
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from hiposeg.errors import UserError
from hiposeg.safeload import load_json, load_yaml

# ------------------------------------------------------------------------------------------
# The loss-term vocabulary (paper Sec. 3.2; README "The method, as implemented"). A new term is a
# name here, its level group, a `lambda_` weight in LossConfig, and its computation in prototypes.py.
# ------------------------------------------------------------------------------------------

LOSS_TERMS: tuple[str, ...] = ("ce", "fh", "hh", "fl", "ll", "align")
COARSE_TERMS = frozenset({"fh", "hh"})  # eqs. 7, 8: pixels and prototypes of the high (coarse) level
FINE_TERMS = frozenset({"fl", "ll"})  # eqs. 9, 10: the low (fine) level
COARSE_LEVEL_TERMS = COARSE_TERMS | {"align"}  # terms that read the high-level prototypes
FINE_LEVEL_TERMS = FINE_TERMS | {"align"}  # terms that read the low-level prototypes
# Sequential schedule (Sec. 3.2, Table 12): the terms each phase boundary switches on, and the phases' names.
PHASE_GROUPS = (COARSE_TERMS, FINE_TERMS, frozenset({"align"}))
PHASE_NAMES = ("1-ce", "2-high", "3-low", "4-align")
SCHEDULES = ("sequential", "joint")
MIN_CROP = 16  # the smallest training crop side (also the smallest sliding window of an exported model)


def phase_starts(schedule: str, phases: tuple[float, float, float], total_iters: int) -> tuple[int, int, int]:
    """The 0-based iterations at which the coarse, fine and align groups switch on (all 0 under "joint"):
    one rule for the loss schedule and for pictures of a run's phases."""
    if schedule == "joint":
        return (0, 0, 0)
    # round() first: 0.035 * 200 is 7.000000000000001 in floating point; that phase starts at 7, not 8
    return tuple(math.ceil(round(f * total_iters, 6)) for f in phases)  # type: ignore[return-value]
# Fields renamed since configs and checkpoints were written: old dotted name -> new one, and why.
RENAMED = {"loss.momentum": ("loss.memory_momentum", "the momentum m of the prototype memory, eq. 15; SGD's is "
                                                     "optim.momentum")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    dataset: str = Field("synthetic", description="recipe name: one of the built-in datasets or 'custom'")
    root: Path | None = Field(None, description="prepared dataset directory (default: data/{dataset})")
    train_split: str = "train"
    val_split: str = "val"
    crop: tuple[int, int] = Field((512, 1024), description="training crop H, W")
    scale_range: tuple[float, float] = Field((0.5, 2.0), description="random rescale range before cropping")
    hflip: bool = True
    color_jitter: float = Field(0.2, ge=0.0, le=1.0, description="brightness/contrast/saturation jitter strength")
    workers: int = Field(4, ge=0, description="data loader worker processes per training process")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("crop")
    @classmethod
    def _crop_positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < MIN_CROP or v[1] < MIN_CROP:
            raise ValueError(f"crop {v[0]}x{v[1]} is too small; use at least {MIN_CROP}x{MIN_CROP}")
        return v

    @field_validator("scale_range")
    @classmethod
    def _scale_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"scale_range {v} must satisfy 0 < min <= max")
        return v

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("std values must be > 0")
        return v

    def resolved_root(self) -> Path:
        return self.root if self.root is not None else Path("data") / self.dataset


DEFAULT_FAMILY = "deeplabv3plus"


def _families() -> dict[str, Any]:
    """The registered model families (`hiposeg.models.FAMILIES`; imported when first needed, as the
    models package imports this module)."""
    from hiposeg.models import FAMILIES

    return FAMILIES


class ModelConfig(_Strict):
    """The segmentation model: its family (`--model`), the family's variant (`--backbone`), where its
    pretrained weights come from, and the projection head g_phi."""

    name: str = Field(DEFAULT_FAMILY, description="model family: deeplabv3plus, hrnet, segformer, fpn or unet")
    backbone: str | None = Field(None, validate_default=True, description=(
        "the family's variant, e.g. resnet101, hrnet_w48, mit_b5 (default: the family's paper-scale one)"))
    output_stride: Literal[8, 16] = Field(8, description="DeepLabV3+ only: 8 (dilated layer3+4) or 16")
    pretrained: Literal["imagenet"] | Path | None = Field(None, description=(
        "backbone weights: 'imagenet' (the library's ImageNet weights, cached once downloaded), a local "
        "weights file, or none"))
    embed_dim: int = Field(256, ge=8, description="d' of the projection head g_phi (eq. 3)")
    embed_source: Literal["decoder", "backbone"] = Field(
        "decoder", description="feature g_phi reads: the stride-4 decoder feature, or backbone stage 4")
    decoder_channels: int = Field(256, ge=8, description="width of DeepLabV3+'s ASPP and decoder (mmsegmentation's "
                                                         "R-101 configs: 512)")
    aux_head: bool = Field(False, description="train an auxiliary FCN head on backbone stage 3 (mmsegmentation's "
                                              "DeepLabV3+ configs; not in the paper); never exported")
    aux_weight: float = Field(0.4, ge=0, description="weight of the auxiliary head's cross-entropy (outside eq. 14)")

    @field_validator("name")
    @classmethod
    def _known_family(cls, v: str) -> str:
        families = _families()
        if v not in families:
            raise ValueError(f"{v!r} is not a model family; choose one of {', '.join(families)}")
        return v

    @field_validator("backbone")
    @classmethod
    def _variant_of_family(cls, v: str | None, info: ValidationInfo) -> str | None:
        family = _families().get(info.data.get("name"))
        if family is None:  # the family itself is refused
            return v
        if v is None:
            return family.default_variant
        if v not in family.variants:
            raise ValueError(f"{v!r} is not a {family.name} variant; choose one of {', '.join(family.variants)}")
        return v

    @field_validator("pretrained", mode="before")
    @classmethod
    def _none_is_no_weights(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip().lower() in ("", "none") else v


class LossConfig(_Strict):
    """HiPoSeg loss terms and hyper-parameters (paper Sec. 3.2; defaults explained in README)."""

    terms: list[str] = Field(default_factory=lambda: list(LOSS_TERMS), description=f"subset of {','.join(LOSS_TERMS)}")
    schedule: Literal[SCHEDULES] = "sequential"  # type: ignore[valid-type]
    phases: tuple[float, float, float] = Field(
        (0.075, 0.225, 0.375), description="fractions of total iterations where coarse, fine and align terms start")
    tau: float = Field(0.1, gt=0, description="temperature of eqs. 7 and 9")
    kappa: float = Field(1.0, gt=0, description="temperature of the repulsion eqs. 8 and 10")
    lambda_ce: float = Field(1.0, ge=0)
    lambda_fh: float = Field(0.1, ge=0)
    lambda_hh: float = Field(0.1, ge=0)
    lambda_fl: float = Field(0.1, ge=0)
    lambda_ll: float = Field(0.1, ge=0)
    lambda_align: float = Field(0.1, ge=0)
    alpha: float = Field(1.0, gt=0, description="weight of L_align.in (eq. 13)")
    beta: float = Field(1.0, gt=0, description="weight of L_align.out (eq. 13)")
    sigma1: float = Field(0.25, gt=0, description="low-to-high margin of eq. 11")
    sigma2: float = Field(1.0, gt=0, description="high-high margin of eq. 12")
    memory_momentum: float = Field(0.9, gt=0, lt=1, description="prototype memory momentum m of eq. 15")

    @field_validator("terms", mode="before")
    @classmethod
    def _split_terms(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [t for t in v.split(",") if t.strip()]
        return v

    @field_validator("terms")
    @classmethod
    def _valid_terms(cls, v: list[str]) -> list[str]:
        return normalize_terms(v)

    @model_validator(mode="after")
    def _margins(self) -> LossConfig:
        if not self.sigma1 < self.sigma2:
            raise ValueError(f"need 0 < sigma1 < sigma2 (paper eq. 13); got sigma1={self.sigma1}, sigma2={self.sigma2}")
        a, b, c = self.phases
        if not 0 <= a <= b <= c <= 1:
            raise ValueError(f"phases {self.phases} must be non-decreasing fractions in [0, 1]")
        return self


def normalize_terms(terms: list[str] | tuple[str, ...]) -> list[str]:
    """Validate a loss-term set: known names, `ce` always on, `align` only with both levels."""
    clean = [t.strip().lower() for t in terms if t.strip()]
    unknown = [t for t in clean if t not in LOSS_TERMS]
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown}; valid terms are {', '.join(LOSS_TERMS)}")
    s = set(clean) | {"ce"}
    if "align" in s and not (s & COARSE_TERMS and s & FINE_TERMS):
        raise ValueError("'align' couples the two levels, so it needs a coarse term (fh or hh) and a fine term "
                         f"(fl or ll) as well; got {','.join(t for t in LOSS_TERMS if t in s)}")
    return [t for t in LOSS_TERMS if t in s]


class OptimConfig(_Strict):
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    iters: int = Field(80_000, ge=1)
    batch_size: int = Field(8, ge=1, description="total over all processes")
    warmup_iters: int = Field(0, ge=0, description="linear lr warm-up iterations (0: none, as in the paper)")


class RunConfig(_Strict):
    out: Path | None = Field(None, description="run directory (default: runs/{dataset}-{backbone})")
    seed: int = 0
    gpus: int = Field(1, ge=1, description="processes (one per GPU, or CPU processes with device=cpu): --gpus N on this "
                                           "machine; a run records its world size (under torchrun: WORLD_SIZE)")
    launcher: Literal["single", "spawn", "torchrun"] = Field(
        "single", description="how the run's processes were started, recorded by train: one process, --gpus N "
                              "(spawned by hiposeg) or torchrun")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    amp: Literal["off", "fp16", "bf16"] = "off"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    ckpt_every: int = Field(1000, ge=1)
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    log_every: int = Field(20, ge=1)
    eval_mode: Literal["auto", "whole", "slide"] = "auto"
    eval_batch_size: int = Field(1, ge=1)
    quiet: bool = False


class TrainConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def resolved_out(self) -> Path:
        if self.run.out is not None:
            return self.run.out
        return Path("runs") / self.run_name()

    def run_name(self) -> str:
        """DATASET-BACKBONE for DeepLabV3+, DATASET-FAMILY-BACKBONE for the other families (whose
        encoders can share DeepLabV3+'s backbone names)."""
        model = self.model
        family = "" if model.name == DEFAULT_FAMILY else f"{model.name}-"
        return f"{self.data.dataset}-{family}{model.backbone}"

    def to_plain(self) -> dict[str, Any]:
        """JSON-compatible dict: safe inside a `weights_only` checkpoint."""
        return self.model_dump(mode="json")

    def with_absolute_paths(self) -> TrainConfig:
        """The data and run folders as absolute paths, so the config and checkpoints saved in the run
        name them wherever a later `--resume` or `eval` is started from."""
        data = self.data.model_copy(update={"root": Path(os.path.abspath(self.data.resolved_root()))})
        run = self.run.model_copy(update={"out": Path(os.path.abspath(self.resolved_out()))})
        return self.model_copy(update={"data": data, "run": run})


# --------------------------------------------------------------------------------------------
# Recipes: the paper's settings (Sec. 4.1) per dataset, and a CPU-sized one for the built-in set.
# --------------------------------------------------------------------------------------------

# The paper recipes start from ImageNet weights (the paper's baselines do); each family at its
# paper-scale variant (ModelConfig's default backbone).
_PAPER_MODEL = {"pretrained": "imagenet"}
RECIPES: dict[str, dict[str, Any]] = {
    "cityscapes": {"data": {"crop": (512, 1024)}, "model": _PAPER_MODEL, "optim": {"batch_size": 8, "iters": 80_000}},
    "mapillary": {"data": {"crop": (512, 1024)}, "model": _PAPER_MODEL, "optim": {"batch_size": 8, "iters": 80_000}},
    "ade20k": {"data": {"crop": (512, 512)}, "model": _PAPER_MODEL, "optim": {"batch_size": 16, "iters": 60_000}},
    "pascal-part": {"data": {"crop": (512, 512)}, "model": _PAPER_MODEL, "optim": {"batch_size": 16, "iters": 60_000}},
    # The built-in default, CPU-sized (its time on 2 CPU cores: BENCHMARKS.md, "Times the README quotes"), with each
    # family's smallest variant (`smallest_variant`), from random weights.
    "synthetic": {
        "data": {"crop": (128, 128), "scale_range": (0.75, 1.5), "workers": 2},
        "model": {"output_stride": 16},
        "optim": {"batch_size": 8, "iters": 400, "lr": 0.02},
        "run": {"ckpt_every": 100, "log_every": 10},
    },
}


def deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["loss.sigma1=0.1", "optim.iters=100"]` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r} is not of the form key=value", hint="Example: --set loss.sigma1=0.1")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"--set {item!r} has an empty key", hint="Example: --set optim.lr=0.02")
        value = parse_value(raw, f"--set {key.strip()}")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise UserError(f"--set {item!r} conflicts with another --set for {p!r}")
        d[parts[-1]] = value
    return upgrade_config(out, "--set")


def parse_value(raw: str, source: str) -> Any:
    """A --set value: a YAML scalar or list (bounded like every file, see `safeload`), or the text
    itself when it is not YAML (e.g. a path with a colon)."""
    if not raw.strip():
        return ""
    try:
        yaml.compose(raw, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return raw
    except RecursionError:
        pass  # load_yaml names it
    return load_yaml(raw, source)


def load_config_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    source = f"config file {path}"
    data = load_json(text, source) if Path(path).suffix.lower() == ".json" else load_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping (sections data, model, loss, optim, run)")
    return upgrade_config(data, source)


def merge_layers(*layers: dict[str, Any], source: str = "configuration") -> dict[str, Any]:
    """Override layers merged (later wins), each read with the current field names first, so an old
    name in an early layer cannot outrank the new name in a later one."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_update(merged, upgrade_config(layer, source))
    return merged


# Recipes that train each family's smallest variant when no --backbone is given.
SMALLEST_VARIANT_RECIPES = frozenset({"synthetic"})


def build_config(*layers: dict[str, Any], source: str = "configuration") -> TrainConfig:
    """Merge override layers (later wins) on top of the dataset's recipe and validate."""
    merged = merge_layers(*layers, source=source)
    dataset = merged.get("data", {}).get("dataset", "synthetic")
    recipe = RECIPES.get(dataset, {})
    merged = deep_update(recipe, merged)
    if dataset in SMALLEST_VARIANT_RECIPES:
        merged = smallest_variant(merged)
    return validate_config(merged, source=source)


def smallest_variant(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with model.backbone set to its family's smallest variant when none is given."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    family = _families().get(model.get("name", DEFAULT_FAMILY))
    if family is None or model.get("backbone") is not None:
        return config  # an unknown family is named by validation; a given variant is kept
    return {**config, "model": {**model, "backbone": family.variants[0]}}


def upgrade_config(data: Any, source: str) -> Any:
    """`data` (a config as JSON-like data) with each renamed field (`RENAMED`) under its current name,
    saying so once per source on stderr. A field given under both names is a UserError."""
    if not isinstance(data, dict):
        return data
    for old, (new, why) in RENAMED.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        fields = data.get(section)
        if not isinstance(fields, dict) or old_key not in fields:
            continue
        if new_key in fields:
            raise UserError(f"{source} gives both {old} and {new}: {old} is the old name of {new}",
                            hint=f"Keep only {new}.")
        data = {**data, section: {new_key if k == old_key else k: v for k, v in fields.items()}}
        _note_once(f"hiposeg: {source} names {old}, which is now {new} ({why}); it is read as "
                   f"{new}={_short_repr(fields[old_key])}. The old name is deprecated.")
    return data


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    """A deprecation note on stderr, once per process, from the launching process or global rank 0."""
    if message not in _NOTED and os.environ.get("RANK", "0") == "0":
        _NOTED.add(message)
        print(message, file=sys.stderr, flush=True)


def validate_config(data: dict[str, Any], source: str = "configuration") -> TrainConfig:
    try:
        return TrainConfig.model_validate(upgrade_config(data, source))
    except ValidationError as e:
        raise UserError(f"invalid {source}:\n{format_validation_error(e)}",
                        hint="Fix the named field (flag, --set key=value, or --config file).") from None


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `hiposeg train --help` lists the sections)"
        got = err.get("input")
        got_s = "" if isinstance(got, dict) or got is None else f" (got {_short_repr(got)})"
        lines.append(f"  - {field or '(top level)'}: {msg}{got_s}")
    return "\n".join(lines)


def _short_repr(value: Any) -> str:
    """A bounded repr (at most 100 characters): a value expanded from YAML aliases can hold a million
    items, and reprlib alone bounds each level, not the whole."""
    r = reprlib.Repr()
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 6
    r.maxstring = r.maxother = 80
    r.maxlevel = 2
    text = r.repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def save_config(cfg: TrainConfig, path: Path) -> None:
    from hiposeg.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_plain(), sort_keys=False))
