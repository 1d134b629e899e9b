"""`hiposeg ablate`: grids of training runs through the one engine, and their results tables.

Every run is `engine.fit(config)` where the config is the usual training config (recipe < --config <
train flags < plain --set) with the configuration's swept fields and the seed laid on top: nothing of
the training path is copied here. This module runs the grid; `plan` builds it (axes, the --set rule,
ablation.json), `results` tabulates it.

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

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from hiposeg.ablate.plan import Plan, Record, Variant, load_records, make_plan, merge_grid, run_config, save_records
from hiposeg.ablate.results import collect_results, plan_table, results_table, write_results
from hiposeg.atomic import TMP_PREFIX
from hiposeg.errors import UserError
from hiposeg.lock import LOCK_NAME, DirectoryLock
from hiposeg.rundir import check_target, checkpoint_path, run_state

__all__ = ["make_plan", "plan_table", "results_table", "run_ablation"]

# What an ablation directory holds; a folder holding other files is not written into.
ABLATION_ENTRIES = {"ablation.json", "runs", "results.md", "results.csv", "results.json", LOCK_NAME}


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """One `hiposeg ablate` per directory at a time (`DirectoryLock`, released by the OS if we die),
    and only in a new, empty or ablation directory outside every prepared dataset."""
    check_target(out, "ablation directory", "an ablation directory", foreign_entries)
    with DirectoryLock(out, "ablation directory"):
        yield


def foreign_entries(out: Path) -> list[str]:
    """What makes `out` a folder of other files: entries an ablation directory does not hold, unless
    it holds ablation.json (then it is one, whatever else the user put there)."""
    if not out.is_dir() or (out / "ablation.json").exists():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in ABLATION_ENTRIES and not p.name.startswith(TMP_PREFIX))


def run_ablation(plan: Plan, console: Console, quiet: bool = False) -> dict[str, Any]:
    """Run (or skip, or resume) every configuration x seed, then write and return the results.

    Returns the results dict with "interrupted": True when a run was stopped by a signal (the
    ablation stops there; rerunning the same command continues it)."""
    from hiposeg.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise UserError("`hiposeg ablate` starts its own processes per run; do not launch it with torchrun",
                        hint="Use `hiposeg ablate --gpus N` instead.")
    check_runs_can_start(plan)
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


def check_runs_can_start(plan: Plan) -> None:
    """What a run would refuse when it starts (`engine.check_before_start`: batch split, devices,
    precision, pretrained file), for every configuration before ablation.json is written, so that
    the same command with the fix runs the grid instead of finding it recorded with the mistake."""
    from hiposeg import engine

    checked: set[str] = set()
    for cfg in plan.configs:
        cfg = engine.as_launched(cfg.with_absolute_paths())
        key = json.dumps([cfg.run.model_dump(mode="json"), cfg.model.model_dump(mode="json"), cfg.optim.batch_size,
                          str(cfg.data.resolved_root())])
        if key not in checked:
            checked.add(key)
            engine.check_before_start(cfg, engine.ensure_prepared(cfg), None)


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
            result = engine.fit(cfg, resume=checkpoint_path(run_dir) if state == "resume" else None)
        except engine.TrainingDiverged as e:
            console.print(Text.assemble((f"{where}: diverged", "red"), f": {e.message}; going on with the next run"))
            continue
        if result.interrupted:
            return True
    return False
