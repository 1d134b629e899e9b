"""`hiposeg ablate`: grids of training runs through the one engine, and their results tables.

Every run is `engine.fit(config)` where the config is the usual training config (recipe < --config <
train flags < plain --set) with the configuration's swept fields and the seed laid on top: nothing of
the training path is copied here.

The grid
    Axes, in this order: `--losses` (each repeat one loss-term set; default: the paper's Table 5 rows;
    the `ce`-only set, the baseline of the Δ columns, is added first when no repeat gives it),
    `--schedule a,b` (Table 12), then each `--set KEY=V1,V2,...` sweep (Tables 10-11) in the order
    given. Configurations are the cartesian product of the axes' values; each `--seeds N` times.
    Names list every axis the user gave (and always the losses), e.g.
    `losses=ce+fh+hh, schedule=joint, loss.sigma1=0.1`.

The `--set` rule
    In a --set value, top-level commas separate sweep values: `--set loss.sigma1=0.1,0.25` is two
    configurations. For a field whose value is itself a list (data.crop, loss.phases, ...), commas
    belong to the value, as in `hiposeg train`; sweep such a field with bracketed values:
    `--set loss.phases=[0,0,0],[0.075,0.225,0.375]`. A value without a comma is a plain override
    of every run. Loss terms, schedule, seed and output dir have their own flags (--set on them is refused).

The ablation directory
    DIR/ablation.json                   the grid: every configuration with its swept values and its
                                        resolved experiment (config minus run.*), the seeds
    DIR/runs/{config}/seed-{s}/         one ordinary run directory per configuration and seed
    DIR/results.{md,csv,json}           mean +- std over finished seeds, delta vs the `ce` row, paper
A rerun skips finished runs (status.json "finished" + report.json), resumes interrupted ones from
their checkpoints/last.pt and starts the rest. A run that diverges (status "diverged") is reported in
the tables, skipped by reruns, and does not stop the others. A configuration is identified by its resolved
experiment, so a rerun with a larger grid adds configurations (the results cover all of them);
a name that now means different settings (e.g. another --iters) is refused with the differences.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import statistics
import types
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hiposeg import __version__
from hiposeg.config import LOSS_TERMS, TrainConfig, build_config, load_config_file, normalize_terms, parse_set
from hiposeg.errors import UserError
from hiposeg.atomic import TMP_PREFIX, atomic_write_json, atomic_write_text, file_in_the_way
from hiposeg.lock import LOCK_NAME, DirectoryLock
from hiposeg.safeload import load_json

ABLATION_FORMAT = "hiposeg-ablation/1"
TABLE5_ROWS: tuple[tuple[str, ...], ...] = (
    ("ce",), ("ce", "fh", "hh"), ("ce", "fl", "ll"), ("ce", "fh", "hh", "fl", "ll"), LOSS_TERMS)
RESERVED_KEYS = {"loss.terms": "--losses ce,fh,hh (repeat --losses for a sweep)",
                 "loss.schedule": "--schedule sequential,joint", "run.seed": "--seed S --seeds N",
                 "run.out": "--out DIR (the ablation directory)"}
# Identity of an experiment: the resolved config minus where it runs and how it logs.
_NOT_IDENTITY = {"run", "data.workers"}

# The paper's fine-level mIoU (%) with ResNet-101 and the full recipe: Table 5 (Cityscapes, five rows)
# and Table 6 (high-only = ce,fh,hh; low-only = ce,fl,ll; both = all terms), keyed by hierarchy name.
_ALL = LOSS_TERMS
_HIGH, _LOW = ("ce", "fh", "hh"), ("ce", "fl", "ll")
PAPER: dict[str, tuple[str, dict[tuple[str, ...], float]]] = {
    "cityscapes": ("Table 5", {("ce",): 73.55, _HIGH: 80.96, _LOW: 81.04, ("ce", "fh", "hh", "fl", "ll"): 79.16,
                               _ALL: 84.04}),
    "ade20k": ("Table 6", {("ce",): 44.48, _LOW: 46.92, _HIGH: 46.87, _ALL: 48.99}),
    "mapillary_v2": ("Table 6", {("ce",): 31.65, _LOW: 37.21, _HIGH: 38.85, _ALL: 41.42}),
    "pascal_part_108": ("Table 6", {("ce",): 46.90, _LOW: 47.02, _HIGH: 47.59, _ALL: 49.33}),
}
# A row of the paper matches a configuration with its terms and the paper's stated settings.
PAPER_SETTINGS = {"loss.schedule": "sequential", "loss.sigma1": 0.25, "loss.sigma2": 1.0, "loss.momentum": 0.9}


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
    """A value as it appears in a configuration name."""
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
        bad = [s for s in values if s not in ("sequential", "joint")]
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
# The ablation directory
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
        return root / "runs" / self.slug / f"seed-{seed}"


def load_records(out: Path) -> list[Record]:
    path = out / "ablation.json"
    if not path.exists():
        return []
    try:
        data = load_json(path.read_bytes(), str(path))
        if data.get("format") != ABLATION_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return [Record(c["name"], c["slug"], c["values"], c["experiment"], list(c["seeds"])) for c in data["configs"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        raise UserError(f"{path} is unreadable ({e})",
                        hint="Choose a new --out, or delete that file to start the ablation's bookkeeping over "
                             "(its run directories are kept and finished runs are reused).") from None


def save_records(out: Path, records: Sequence[Record]) -> None:
    atomic_write_json(out / "ablation.json", {
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


def read_status(run_dir: Path) -> dict[str, Any]:
    try:
        status = load_json((run_dir / "status.json").read_bytes(), str(run_dir / "status.json"))
    except (OSError, UserError):
        return {}
    return status if isinstance(status, dict) else {}


def run_state(run_dir: Path) -> str:
    """"finished" (status finished + report.json), "diverged" (the engine stopped it on a non-finite
    loss: resuming would repeat that), "resume" (a last.pt to continue), or "new"."""
    state = read_status(run_dir).get("state")
    if state == "finished" and (run_dir / "report.json").exists():
        return "finished"
    if state == "diverged":
        return "diverged"
    return "resume" if (run_dir / "checkpoints" / "last.pt").exists() else "new"


# What an ablation directory holds; a folder holding other files is not written into.
ABLATION_ENTRIES = {"ablation.json", "runs", "results.md", "results.csv", "results.json", LOCK_NAME}


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """One `hiposeg ablate` per directory at a time (`DirectoryLock`, released by the OS if we die),
    and only in a new, empty or ablation directory outside every prepared dataset."""
    from hiposeg.data.dataset import refuse_prepared_dataset

    blocker = file_in_the_way(out)
    if blocker is not None:
        raise UserError(f"ablation directory {out} cannot be created: {blocker} is a file, not a folder",
                        hint="Choose another --out (a folder, or a new name to create).")
    refuse_prepared_dataset(out, "ablation directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ABLATION_ENTRIES
                     and not p.name.startswith(TMP_PREFIX)) if out.is_dir() else []
    if foreign and not (out / "ablation.json").exists():
        raise UserError(f"{out} is not an ablation directory: it holds {', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}",
                        hint="Choose a new or empty --out; hiposeg does not write into a folder of other files.")
    with DirectoryLock(out, "ablation directory"):
        yield


# ==========================================================================================
# Running
# ==========================================================================================


@dataclass
class Plan:
    out: Path
    layers: list[dict[str, Any]]
    variants: list[Variant]
    configs: list[TrainConfig]
    seeds: list[int]


def make_plan(config_file: Path | None, flags: dict[str, Any], sets: Sequence[str], losses: Sequence[str] | None,
              schedule: str | None, seeds: int, seed: int | None, out: Path | None) -> Plan:
    """Validate everything up front: every configuration is built before the first run starts."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    plain, sweeps = split_sets(sets)
    layers = [load_config_file(config_file) if config_file else {}, flags, parse_set(plain)]
    base = build_config(*layers, source="ablation base configuration")
    first = base.run.seed if seed is None else seed
    seed_list = list(range(first, first + seeds))
    out = out or Path("runs") / f"ablate-{base.data.dataset}-{base.model.backbone}"
    variants = build_grid(losses, schedule, sweeps)
    configs = [build_config(*layers, v.overrides(), source=f"configuration {v.name!r}") for v in variants]
    return Plan(out, layers, variants, configs, seed_list)


def run_config(plan: Plan, rec: Record, variant: Variant, seed: int) -> TrainConfig:
    """The run's config: the usual layers, the configuration's swept values, then seed and directory."""
    return build_config(*plan.layers, variant.overrides(),
                        {"run": {"seed": seed, "out": str(rec.run_dir(plan.out, seed))}},
                        source=f"configuration {variant.name!r}, seed {seed}")


def run_ablation(plan: Plan, console: Console, quiet: bool = False) -> dict[str, Any]:
    """Run (or skip, or resume) every configuration x seed, then write and return the results.

    Returns the results dict with "interrupted": True when a run was stopped by a signal (the
    ablation stops there; rerunning the same command continues it)."""
    from hiposeg.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise UserError("`hiposeg ablate` starts its own processes per run; do not launch it with torchrun",
                        hint="Use `hiposeg ablate --gpus N` instead.")
    with locked(plan.out):
        records, mine, added = merge_grid(load_records(plan.out), list(zip(plan.variants, plan.configs)), plan.seeds)
        known = len(records) - len(added)
        if known and added and not quiet:
            console.print(Text(f"{plan.out} already holds {known} configuration(s); this grid adds {len(added)}: "
                               f"{', '.join(r.name for r in added)}. The results cover all {len(records)}."))
        save_records(plan.out, records)
        jobs = list(dict.fromkeys((rec.slug, s) for rec in mine for s in plan.seeds))  # grid order, once each
        by_slug = {rec.slug: (rec, variant) for rec, variant in zip(mine, plan.variants)}
        interrupted = False
        try:
            interrupted = run_jobs(plan, jobs, by_slug, console, quiet)
        finally:  # tables of what finished, even when a run fails
            results = collect_results(plan.out, records)
            write_results(plan.out, results)
    results["interrupted"] = interrupted
    return results


def run_jobs(plan: Plan, jobs: Sequence[tuple[str, int]], by_slug: dict[str, tuple[Record, Variant]],
             console: Console, quiet: bool) -> bool:
    """Each (configuration, seed) in turn; True when a run was interrupted (the rest then waits).
    A run that diverges is a result of the ablation, not the end of it: it is reported and skipped."""
    from hiposeg import engine

    for k, (slug, s) in enumerate(jobs, 1):
        rec, variant = by_slug[slug]
        run_dir = rec.run_dir(plan.out, s)
        state = run_state(run_dir)
        where = f"[{k}/{len(jobs)}] {rec.name}, seed {s}"
        if state in ("finished", "diverged"):
            if not quiet:
                console.print(Text(f"{where}: {state} earlier, skipped ({run_dir}"
                                   + ("; delete it to try again)" if state == "diverged" else ")")))
            continue
        if not quiet:
            console.rule(Text(f"{where}" + (" (resuming)" if state == "resume" else "")))
        cfg = run_config(plan, rec, variant, s)
        try:
            result = engine.fit(cfg, resume=run_dir / "checkpoints" / "last.pt" if state == "resume" else None)
        except engine.TrainingDiverged as e:
            console.print(Text.assemble((f"{where}: diverged", "red"), f": {e.message}; going on with the next run"))
            continue
        if result.interrupted:
            return True
    return False


# ==========================================================================================
# Results
# ==========================================================================================


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paper_value(hierarchy: str | None, values: dict[str, Any], experiment: dict[str, Any]) -> tuple[str, float] | None:
    """(table, fine mIoU %) of the paper's row for this configuration, if it has one."""
    if hierarchy not in PAPER:
        return None
    table, rows = PAPER[hierarchy]
    loss = experiment.get("loss", {})
    if any(loss.get(k.split(".")[1]) != v for k, v in PAPER_SETTINGS.items()):
        return None
    terms = tuple(values.get("loss.terms") or loss.get("terms", ()))
    return (table, rows[terms]) if terms in rows else None


def collect_results(out: Path, records: Sequence[Record]) -> dict[str, Any]:
    """Read every run's report.json; aggregate per configuration over its finished seeds."""
    rows: list[dict[str, Any]] = []
    hierarchy: str | None = None
    for rec in records:
        runs = []
        for s in rec.seeds:
            d = rec.run_dir(out, s)
            state = run_state(d)
            entry: dict[str, Any] = {"seed": s, "dir": str(d.relative_to(out)), "state": state}
            if state == "diverged":
                entry["error"] = read_status(d).get("error")
            if state == "finished":
                rep = load_json((d / "report.json").read_bytes(), str(d / "report.json"))
                hierarchy = hierarchy or rep.get("hierarchy", {}).get("name")
                entry.update({k: rep["levels"].get(k, {}).get("mIoU") for k in ("fine", "coarse")})
            runs.append(entry)
        row: dict[str, Any] = {"config": rec.name, "dir": f"runs/{rec.slug}", "values": rec.values, "runs": runs,
                               "finished": sum(r["state"] == "finished" for r in runs),
                               "diverged": sum(r["state"] == "diverged" for r in runs), "total": len(runs)}
        for level in ("fine", "coarse"):
            vals = [r[level] for r in runs if r.get(level) is not None]
            m, sd = mean_std(vals)
            row[level] = {"mean": m, "std": sd, "n": len(vals)}
        rows.append(row)
    for row, rec in zip(rows, records):
        ref = ce_reference(rec, records)
        ref_row = rows[records.index(ref)] if ref is not None else None
        row["delta_vs_ce"] = {lv: (row[lv]["mean"] - ref_row[lv]["mean"]
                                   if ref_row and row[lv]["mean"] is not None and ref_row[lv]["mean"] is not None
                                   else None) for lv in ("fine", "coarse")}
        row["ce_reference"] = ref.name if ref is not None else None
        paper = paper_value(hierarchy, rec.values, rec.experiment)
        row["paper"] = {"table": paper[0], "fine_mIoU": paper[1]} if paper else None
    return {"format": "hiposeg-ablation-results/1", "hierarchy": hierarchy, "configs": rows,
            "notes": NOTES}


NOTES = ("mIoU in %, mean over finished seeds ± sample standard deviation (n − 1). Δ: difference of the means "
         "to the `ce`-only configuration with otherwise equal settings. Paper: fine-level mIoU from the paper's "
         "Table 5 (Cityscapes) / Table 6 (high-only = ce,fh,hh; low-only = ce,fl,ll; both = all terms), "
         "ResNet-101 with the full recipe; shown where the terms match a row and the schedule, σ1, σ2 and m are the "
         "paper's.")


def ce_reference(rec: Record, records: Sequence[Record]) -> Record | None:
    """The CE-only configuration with otherwise equal settings, up to the loss fields a CE-only run
    ignores (`ignored_by_ce`)."""
    def ce_view(exp: dict[str, Any]) -> dict[str, Any]:
        loss = exp.get("loss", {})
        return {**exp, "loss": {k: v for k, v in loss.items() if k != "terms" and not ignored_by_ce(f"loss.{k}")}}

    mine = ce_view(rec.experiment)
    return next((r for r in records if r.experiment.get("loss", {}).get("terms") == ["ce"]
                 and ce_view(r.experiment) == mine), None)


def _pm(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.2f}" + (f" ± {stat['std']:.2f}" if stat["std"] is not None else "")


def _delta(v: float | None) -> str:
    return "—" if v is None else f"{v:+.2f}"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by the Rich table and results.md."""
    paper_tables = {r["paper"]["table"] for r in results["configs"] if r["paper"]}
    header = ["config", "fine mIoU", "coarse mIoU", "Δ fine", "Δ coarse"]
    if paper_tables:
        header.append(f"paper fine mIoU ({', '.join(sorted(paper_tables))})")
    header.append("runs")
    cells = []
    for r in results["configs"]:
        row = [r["config"], _pm(r["fine"]), _pm(r["coarse"]), _delta(r["delta_vs_ce"]["fine"]),
               _delta(r["delta_vs_ce"]["coarse"])]
        if paper_tables:
            row.append(f"{r['paper']['fine_mIoU']:.2f}" if r["paper"] else "—")
        row.append(f"{r['finished']}/{r['total']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else ""))
        cells.append(row)
    return header, cells


def results_table(results: dict[str, Any]) -> Table:
    header, cells = table_rows(results)
    title = "Ablation" + (f" on {results['hierarchy']}" if results["hierarchy"] else "")
    t = Table(title=Text(title), title_justify="left", caption=Text(NOTES), caption_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right", style="bold" if h == "fine mIoU" else None,
                     overflow="fold")
    for row in cells:
        t.add_row(*(Text(c) for c in row))  # configuration names hold user values: never Rich markup
    return t


def results_markdown(results: dict[str, Any]) -> str:
    header, cells = table_rows(results)
    lines = [f"# Ablation{' on ' + results['hierarchy'] if results['hierarchy'] else ''}", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines + ["", NOTES, ""])


def results_csv(results: dict[str, Any]) -> str:
    fields = sorted({k for r in results["configs"] for k in r["values"]})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["config", *fields, "fine_mIoU_mean", "fine_mIoU_std", "coarse_mIoU_mean", "coarse_mIoU_std",
                "delta_fine_vs_ce", "delta_coarse_vs_ce", "paper_table", "paper_fine_mIoU", "runs_finished",
                "runs_diverged", "runs_total"])

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.4f}"

    for r in results["configs"]:
        vals = [("+".join(r["values"][f]) if f == "loss.terms" else show(r["values"][f])) if f in r["values"] else ""
                for f in fields]
        w.writerow([r["config"], *vals, num(r["fine"]["mean"]), num(r["fine"]["std"]), num(r["coarse"]["mean"]),
                    num(r["coarse"]["std"]), num(r["delta_vs_ce"]["fine"]), num(r["delta_vs_ce"]["coarse"]),
                    r["paper"]["table"] if r["paper"] else "", num(r["paper"]["fine_mIoU"]) if r["paper"] else "",
                    r["finished"], r["diverged"], r["total"]])
    return buf.getvalue()


def write_results(out: Path, results: dict[str, Any]) -> None:
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    atomic_write_text(out / "results.csv", results_csv(results))


def plan_table(plan: Plan) -> Table:
    """`--dry-run`: what would run, where, and what a rerun would do with each run directory."""
    records, mine, added = merge_grid(load_records(plan.out), list(zip(plan.variants, plan.configs)), plan.seeds)
    t = Table(title=Text(f"Ablation plan: {len(plan.variants)} configuration(s) x {len(plan.seeds)} seed(s) in "
                         f"{plan.out} ({len(added)} new)"), title_justify="left")
    for name in ("config", "directory", "iters", *(f"seed {s}" for s in plan.seeds)):
        t.add_column(name, justify="left" if name in ("config", "directory") else "right", overflow="fold")
    for rec, cfg in zip(mine, plan.configs):
        states = [run_state(rec.run_dir(plan.out, s)) for s in plan.seeds]
        t.add_row(Text(rec.name), Text(f"runs/{rec.slug}"), str(cfg.optim.iters),
                  *({"finished": "skip", "diverged": "skip (diverged)", "resume": "resume", "new": "train"}[st]
                    for st in states))
    return t
