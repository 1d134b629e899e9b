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

from hiposeg.ablate.plan import (RUNS_DIR, Plan, Record, Variant, is_ablation_directory, load_records, make_plan,
                                 merge_grid, run_config, save_records)
from hiposeg.ablate.results import collect_results, plan_table, results_table, write_results
from hiposeg.atomic import refuse_links, write_failure
from hiposeg.errors import UserError
from hiposeg.lock import DirectoryLock
from hiposeg.rundir import check_target, checkpoint_path, run_state

__all__ = ["make_plan", "plan_table", "results_table", "run_ablation"]

@contextmanager
def locked(out: Path) -> Iterator[None]:
    """One `hiposeg ablate` per directory at a time (`DirectoryLock`, released by the OS if we die),
    and only in a new, empty or ablation directory (provably: `is_ablation_directory`) outside every
    prepared dataset, whose runs/ folder is not a link (the runs would be written where it points)."""
    check_target(out, "ablation directory", "an ablation directory", is_ablation_directory)
    with DirectoryLock(out, "ablation directory"):
        refuse_links(out, [RUNS_DIR], "ablation directory")
        yield


def run_ablation(plan: Plan, console: Console, quiet: bool = False) -> dict[str, Any]:
    """Run (or skip, or resume) every configuration x seed, then write and return the results.

    Returns the results dict with "interrupted": True when a run was stopped by a signal (the
    ablation stops there; rerunning the same command continues it)."""
    from hiposeg.distributed import launched_by_torchrun, torchrun_variables

    if launched_by_torchrun():
        raise UserError(f"{torchrun_variables()} are set, as torchrun sets them, but `hiposeg ablate` starts its own "
                        "processes per run", hint="Unset them (`unset RANK WORLD_SIZE LOCAL_RANK`) and launch without "
                                                  "torchrun; `hiposeg ablate --gpus N` runs N processes per run.")
    check_runs_can_start(plan)
    with locked(plan.out):
        records, mine, added = merge_grid(load_records(plan.out), list(zip(plan.variants, plan.configs)), plan.seeds)
        known = len(records) - len(added)
        if known and added and not quiet:
            console.print(Text(f"{plan.out} already holds {known} configuration(s); this grid adds {len(added)}: "
                               f"{', '.join(r.name for r in added)}. The results cover all {len(records)}."))
        with ablation_writes():
            save_records(plan.out, records)
        jobs = list(dict.fromkeys((rec.slug, s) for rec in mine for s in plan.seeds))  # grid order, once each
        by_slug = {rec.slug: (rec, variant) for rec, variant in zip(mine, plan.variants)}
        try:
            interrupted = run_jobs(plan, jobs, by_slug, console, quiet)
        except BaseException:  # tables of what finished, then the run's own error (never hidden by theirs)
            publish_after_failure(plan.out, records, console)
            raise
        results = publish_results(plan.out, records)
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


@contextmanager
def ablation_writes() -> Iterator[None]:
    """A failed write into the ablation directory (full, read-only) as one clear error; the writes
    are atomic, so every file there is still complete."""
    try:
        yield
    except OSError as e:
        raise UserError(f"could not write {write_failure(e)}",
                        hint="Free disk space (or make the folder writable), then rerun the same command: finished "
                             "runs are kept and skipped.") from None


def publish_results(out: Path, records: Sequence[Record]) -> dict[str, Any]:
    """Collect every run's results and write results.{json,md,csv}."""
    results = collect_results(out, records)
    with ablation_writes():
        write_results(out, results)
    return results


def publish_after_failure(out: Path, records: Sequence[Record], console: Console) -> None:
    """The tables of what finished, after a run failed: a failure to write them is only noted, so
    that the user sees the run's error, not this one."""
    try:
        publish_results(out, records)
    except UserError as e:
        console.print(Text(f"note: the results tables were not updated ({e.message})", style="yellow"))


def run_jobs(plan: Plan, jobs: Sequence[tuple[str, int]], by_slug: dict[str, tuple[Record, Variant]],
             console: Console, quiet: bool) -> bool:
    """Each (configuration, seed) in turn; True when a run was interrupted (the rest then waits).
    A run that diverges is a result of the ablation, not the end of it: it is reported and skipped."""
    from hiposeg import engine

    for k, (slug, s) in enumerate(jobs, 1):
        rec, variant = by_slug[slug]
        run_dir = rec.run_dir(plan.out, s)
        refuse_links(plan.out, [str(run_dir.relative_to(plan.out))], "ablation directory")
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
