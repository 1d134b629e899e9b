"""The grid of an ablation: its axes and configurations (`build_grid`, the `--set` rule), the plan
of every run's config (`make_plan`), and the records of ablation.json that identify a configuration
by its resolved experiment (`merge_grid`). README "Ablations" and `hiposeg.ablate` tell the rules.
"""

from __future__ import annotations

import itertools
import json
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from hiposeg import __version__
from hiposeg.atomic import atomic_write_json
from hiposeg.config import (DEFAULT_FAMILY, LOSS_TERMS, RENAMED, SCHEDULES, TrainConfig, build_config,
                            load_config_file, normalize_terms, parse_set, upgrade_config)
from hiposeg.errors import UserError
from hiposeg.rundir import read_json

ABLATION_FORMAT = "hiposeg-ablation/1"
ABLATION_FILE = "ablation.json"
RUNS_DIR = "runs"  # DIR/runs/{config}/seed-{s}: one run directory per configuration and seed
TABLE5_ROWS: tuple[tuple[str, ...], ...] = (
    ("ce",), ("ce", "fh", "hh"), ("ce", "fl", "ll"), ("ce", "fh", "hh", "fl", "ll"), LOSS_TERMS)
RESERVED_KEYS = {"loss.terms": "--losses ce,fh,hh (repeat --losses for a sweep)",
                 "loss.schedule": "--schedule sequential,joint", "run.seed": "--seed S --seeds N",
                 "run.out": "--out DIR (the ablation directory)"}
# Identity of an experiment: the resolved config minus where it runs and how it logs.
_NOT_IDENTITY = {"run", "data.workers"}


# ==========================================================================================
# The grid
# ==========================================================================================


@dataclass(frozen=True)
class Axis:
    """One swept config field: `label` names it in configuration names, `field` is its dotted path."""

    label: str
    field: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Variant:
    """One configuration: values of the swept fields, by dotted path, and its readable name."""

    name: str
    values: dict[str, Any]

    @property
    def slug(self) -> str:
        return slugify(self.name)

    def overrides(self) -> dict[str, Any]:
        return nested(self.values)


def slugify(name: str) -> str:
    """A directory name for a configuration name: `losses=ce+fh, loss.tau=0.1` -> `losses=ce+fh__loss.tau=0.1`."""
    return re.sub(r"[^A-Za-z0-9._+=,\[\]-]", "_", name.replace(", ", "__"))


def nested(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in values.items():
        *parents, leaf = path.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def show(value: Any) -> str:
    """A value as it appears in a configuration name (a model axis value {name, backbone} as NAME:BACKBONE)."""
    if isinstance(value, dict):
        return ":".join(show(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def parse_losses(groups: Sequence[str]) -> list[list[str]]:
    """`--losses` values -> validated term lists (`ce` always added). One list per repeat."""
    sets: list[list[str]] = []
    for g in groups:
        try:
            terms = normalize_terms(g.replace("+", ",").split(","))
        except ValueError as e:
            hint = (f"Valid terms: {', '.join(LOSS_TERMS)}. `ce` is always on; `align` needs a coarse term (fh/hh) "
                    "and a fine term (fl/ll). Example: --losses fh,hh --losses fl,ll")
            raise UserError(f"--losses {g!r}: {e}", hint=hint) from None
        if terms in sets:
            raise UserError(f"--losses {g!r} repeats the loss set {'+'.join(terms)}")
        sets.append(terms)
    return sets


def split_top_level(raw: str) -> list[str]:
    """Split on commas outside brackets/braces/quotes: `[0,1],[2,3]` -> `[0,1]`, `[2,3]`."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


def is_sequence_field(path: str) -> bool:
    """Whether the TrainConfig field at `path` holds a list/tuple (then commas belong to its value)."""
    model: Any = TrainConfig
    annotation: Any = None
    for part in path.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = annotation
    return _holds_sequence(annotation)


def _holds_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # e.g. list[str] | None
        return any(_holds_sequence(a) for a in typing.get_args(annotation))
    return (origin or annotation) in (list, tuple)


def split_sets(items: Sequence[str]) -> tuple[list[str], list[Axis]]:
    """--set items -> (plain overrides for every run, sweep axes) by the rule in the module docstring."""
    plain: list[str] = []
    axes: list[Axis] = []
    for item in items:
        parse_set([item])  # the same form checks as `hiposeg train`
        key, _, raw = item.partition("=")
        key = ".".join(p for p in key.strip().split(".") if p)
        key = RENAMED.get(key, (key,))[0]  # an old field name sweeps the field under its current name
        if key in RESERVED_KEYS:
            raise UserError(f"--set {item!r}: in `hiposeg ablate`, {key} has its own flag",
                            hint=f"Use {RESERVED_KEYS[key]}.")
        pieces = split_top_level(raw)
        if len(pieces) < 2 or (is_sequence_field(key) and not all(p.strip().startswith("[") for p in pieces)):
            plain.append(item)
            continue
        if any(not p.strip() for p in pieces):
            raise UserError(f"--set {item!r} has an empty value in its comma list",
                            hint="Example: --set loss.sigma1=0.1,0.25")
        values = tuple(parse_set([f"v={p.strip()}"])["v"] for p in pieces)
        if len(set(map(show, values))) < len(values):
            raise UserError(f"--set {item!r} lists a value twice")
        if any(a.field == key for a in axes):
            raise UserError(f"--set {key}=... is swept twice; give all its values in one comma list")
        axes.append(Axis(key, key, values))
    return plain, axes


def parse_models(spec: str | None) -> list[dict[str, str]]:
    """`--model a,b:variant` -> [{"name": "a"}, {"name": "b", "backbone": "variant"}], families checked
    (the variants are checked with every configuration)."""
    from hiposeg.models import FAMILIES

    if spec is None:
        return []
    items = [p.strip() for p in spec.split(",")]
    models = []
    for item in items:
        name, _, variant = item.partition(":")
        if name not in FAMILIES:
            raise UserError(f"--model {spec!r}: {name!r} is not a model family",
                            hint=f"Choose among {', '.join(FAMILIES)}, each optionally FAMILY:VARIANT, e.g. "
                                 "--model deeplabv3plus,hrnet,segformer")
        models.append({"name": name, **({"backbone": variant} if variant else {})})
    if len(set(map(show, models))) < len(models):
        raise UserError(f"--model {spec!r} lists a model twice")
    return models


def model_layer(models: list[dict[str, str]]) -> tuple[dict[str, Any], list[Axis]]:
    """One --model value sets the model of every run (a config layer); several are a sweep axis."""
    if len(models) == 1:
        return {"model": models[0]}, []
    return {}, [Axis("model", "model", tuple(models))] if models else []


def build_grid(losses: Sequence[str] | None, schedule: str | None, sweeps: Sequence[Axis]) -> list[Variant]:
    """The cartesian product of the loss sets, schedules and --set sweeps (in that axis order).

    The `ce`-only set leads the loss axis even when --losses does not name it: it is the baseline
    every Δ column is measured against. A CE-only run ignores every loss.* field but lambda_ce (no
    prototypes, no schedule), so its rows drop those axes and are trained once per remaining combination."""
    loss_sets = parse_losses(losses) if losses else [list(r) for r in TABLE5_ROWS]
    if ["ce"] not in loss_sets:
        loss_sets.insert(0, ["ce"])
    axes = [Axis("losses", "loss.terms", tuple(loss_sets))]
    if schedule is not None:
        values = [s.strip() for s in schedule.split(",") if s.strip()]
        bad = [s for s in values if s not in SCHEDULES]
        if bad or not values or len(set(values)) < len(values):
            raise UserError(f"--schedule {schedule!r}: give sequential and/or joint, comma-separated, once each",
                            hint="Example: --schedule sequential,joint (paper Table 12)")
        axes.append(Axis("schedule", "loss.schedule", tuple(values)))
    axes += sweeps
    variants, names = [], set()
    for combo in itertools.product(*(a.values for a in axes)):
        kept = list(zip(axes, combo))
        if combo[0] == ["ce"]:
            kept = [(a, v) for a, v in kept if not ignored_by_ce(a.field)]
        name = ", ".join(f"{a.label}={'+'.join(v) if a.field == 'loss.terms' else show(v)}" for a, v in kept)
        if name not in names:
            names.add(name)
            variants.append(Variant(name, {a.field: v for a, v in kept}))
    return variants


def ignored_by_ce(field: str) -> bool:
    """Loss fields that cannot change a CE-only run: all of loss.* except the terms and lambda_ce."""
    return field.startswith("loss.") and field not in ("loss.terms", "loss.lambda_ce")


# ==========================================================================================
# The records of ablation.json
# ==========================================================================================


def experiment_of(cfg: TrainConfig) -> dict[str, Any]:
    """What makes two runs the same experiment: the config minus run.* and loader workers, with the
    data folder as an absolute path."""
    plain = cfg.to_plain()
    plain["data"]["root"] = str(cfg.data.resolved_root().resolve())
    out = {}
    for section, fields in plain.items():
        if section in _NOT_IDENTITY:
            continue
        out[section] = {k: v for k, v in fields.items() if f"{section}.{k}" not in _NOT_IDENTITY}
    return out


def flat_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted fields where two nested dicts differ, as `field: a -> b`."""
    diffs = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += flat_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            diffs.append(f"{prefix}{k}: {show(va)} -> {show(vb)}")
    return diffs


@dataclass
class Record:
    """One configuration of the ablation directory (an entry of ablation.json's "configs")."""

    name: str
    slug: str
    values: dict[str, Any]
    experiment: dict[str, Any]
    seeds: list[int] = field(default_factory=list)

    def run_dir(self, root: Path, seed: int) -> Path:
        return root / RUNS_DIR / self.slug / f"seed-{seed}"


def is_ablation_directory(out: Path) -> bool:
    """Whether `out` provably holds an ablation: an ablation.json of hiposeg's format (file names such
    as results.csv or runs/ prove nothing: they are common in other tools' folders)."""
    try:
        data = read_json(out / ABLATION_FILE)
    except UserError:
        return False
    return isinstance(data, dict) and data.get("format") == ABLATION_FORMAT and isinstance(data.get("configs"), list)


def load_records(out: Path) -> list[Record]:
    path = out / ABLATION_FILE
    if not path.exists():
        return []
    try:
        data = read_json(path)
        if data.get("format") != ABLATION_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return [Record(c["name"], c["slug"], c["values"], upgrade_experiment(c["experiment"], path), list(c["seeds"]))
                for c in data["configs"]]
    except (ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        raise UserError(f"{path} is unreadable ({e.message if isinstance(e, UserError) else e})",
                        hint="Restore that file, or choose a new --out.") from None


def upgrade_experiment(experiment: dict[str, Any], path: Path) -> dict[str, Any]:
    """A recorded experiment under today's field names (`config.RENAMED`), and with the model family,
    which experiments recorded before there were several do not name (they are DeepLabV3+)."""
    experiment = upgrade_config(experiment, f"{path}")
    model = experiment.get("model")
    if isinstance(model, dict) and "name" not in model:
        experiment = {**experiment, "model": {"name": DEFAULT_FAMILY, **model}}
    return experiment


def save_records(out: Path, records: Sequence[Record]) -> None:
    atomic_write_json(out / ABLATION_FILE, {
        "format": ABLATION_FORMAT, "hiposeg_version": __version__,
        "configs": [{"name": r.name, "slug": r.slug, "values": r.values, "seeds": r.seeds, "experiment": r.experiment}
                    for r in records]})


def merge_grid(records: list[Record], planned: Sequence[tuple[Variant, TrainConfig]], seeds: Sequence[int]
               ) -> tuple[list[Record], list[Record], list[Record]]:
    """(all records, the record of each planned configuration, the newly added ones). A planned configuration
    whose experiment equals a recorded one IS that one (whatever its name); a new one must not take
    a recorded name."""
    records = list(records)
    mine: list[Record] = []
    added: list[Record] = []
    for variant, cfg in planned:
        exp = experiment_of(cfg)
        rec = next((r for r in records if r.experiment == exp), None)
        if rec is None:
            clash = next((r for r in records if r.slug == variant.slug), None)
            if clash is not None:
                diff = "; ".join(flat_diff(clash.experiment, exp)[:6])
                raise UserError(f"this ablation directory already has a configuration {variant.name!r} with different "
                                f"settings ({diff})",
                                hint="Use a new --out for the new settings, or rerun with the original flags.")
            rec = Record(variant.name, variant.slug, variant.values, exp)
            records.append(rec)
            added.append(rec)
        rec.seeds = sorted(set(rec.seeds) | set(seeds))
        mine.append(rec)
    return records, mine, added


# ==========================================================================================
# The plan: every configuration built before the first run starts
# ==========================================================================================


@dataclass
class Plan:
    out: Path
    layers: list[dict[str, Any]]
    variants: list[Variant]
    configs: list[TrainConfig]
    seeds: list[int]


def make_plan(config_file: Path | None, flags: dict[str, Any], sets: Sequence[str], losses: Sequence[str] | None,
              schedule: str | None, seeds: int, seed: int | None, out: Path | None, models: str | None = None) -> Plan:
    """Validate everything up front: every configuration is built before the first run starts."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    plain, sweeps = split_sets(sets)
    one_model, model_axes = model_layer(parse_models(models))
    layers = [load_config_file(config_file) if config_file else {}, flags, one_model, parse_set(plain)]
    base = build_config(*layers, source="ablation base configuration")
    first = base.run.seed if seed is None else seed
    seed_list = list(range(first, first + seeds))
    out = out or Path("runs") / f"ablate-{base.data.dataset + '-models' if model_axes else base.run_name()}"
    variants = build_grid(losses, schedule, [*model_axes, *sweeps])
    configs = [build_config(*layers, v.overrides(), source=f"configuration {v.name!r}") for v in variants]
    return Plan(out, layers, variants, configs, seed_list)


def run_config(plan: Plan, rec: Record, variant: Variant, seed: int) -> TrainConfig:
    """The run's config: the usual layers, the configuration's swept values, then seed and directory."""
    return build_config(*plan.layers, variant.overrides(),
                        {"run": {"seed": seed, "out": str(rec.run_dir(plan.out, seed))}},
                        source=f"configuration {variant.name!r}, seed {seed}")
