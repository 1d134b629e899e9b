"""`hiposeg plot` from its inputs to its files: read the runs, score them, take one pass over the
split, draw every picture that the inputs allow (saying why for the others), write numbers.json and
the HTML page.

The output folder must be new or empty, or one a previous `hiposeg plot` wrote (its numbers.json
says so: its files are replaced), unless `--overwrite`; it never lies inside a prepared dataset, and
one process at a time writes it (`DirectoryLock`). Nothing is removed, every file is written atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hiposeg.atomic import atomic_write_json, atomic_write_text, check_writable, file_in_the_way
from hiposeg.errors import UserError
from hiposeg.lock import DirectoryLock
from hiposeg.plots import pictures, require_plotting
from hiposeg.plots.inputs import Run, check_same_hierarchy, label_runs, read_ablation, read_run
from hiposeg.plots.models import model_of, report_fits, scores_of
from hiposeg.plots.page import render_page
from hiposeg.plots.sampling import evenly_spaced, prepared_split, sample_split
from hiposeg.safeload import load_json

PLOTS_FORMAT = "hiposeg-plots/1"
NUMBERS_FILE = "numbers.json"
PAGE_FILE = "report.html"


@dataclass
class PlotOptions:
    out: Path | None = None
    data: Path | None = None
    split: str | None = None
    which: str = "last"
    pixels_per_class: int = 200
    images: int = 100
    embedding: str = "tsne"
    seed: int = 0
    gallery: int = 3
    show: list[str] = field(default_factory=list)
    svg: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    overwrite: bool = False


@dataclass
class PlotSummary:
    out: Path
    page: Path
    pictures: list[pictures.Picture]
    skipped: dict[str, str]
    seconds: float


def check_out(out: Path, overwrite: bool) -> None:
    """The rule of the module docstring, before anything is computed."""
    from hiposeg.data.dataset import refuse_prepared_dataset

    refuse_prepared_dataset(out, "--out")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise UserError(f"--out {out} cannot be created: {blocker} is a file, not a folder",
                        hint="Choose another --out (a folder, or a new name to create).")
    entries = sorted(p.name for p in out.iterdir() if p.name != ".hiposeg.lock") if out.is_dir() else []
    if entries and not overwrite and not is_plot_folder(out):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"--out {out} is not empty and was not written by `hiposeg plot` ({len(entries)} entries: "
                        f"{shown})", hint="Choose a new or empty folder, or add --overwrite to replace files of the "
                                          "same names in it (other files are left alone).")
    check_writable(out, "--out folder")


def is_plot_folder(out: Path) -> bool:
    """Whether `out` holds the numbers.json of an earlier `hiposeg plot`."""
    try:
        data = load_json((out / NUMBERS_FILE).read_bytes(), str(out / NUMBERS_FILE))
    except (OSError, UserError):
        return False
    return isinstance(data, dict) and data.get("format") == PLOTS_FORMAT


def make_plots(run_dirs: list[Path], baseline_dir: Path | None, ablation_dir: Path | None, opts: PlotOptions,
               say: Callable[[str], None] = lambda s: None) -> PlotSummary:
    """Everything `hiposeg plot` writes (module docstring)."""
    t0 = time.perf_counter()
    require_plotting()
    if not run_dirs and ablation_dir is None:
        raise UserError("give a run directory to plot (and --baseline RUN), or --ablation DIR",
                        hint="Example: hiposeg plot runs/hiposeg --baseline runs/ce")
    runs = [read_run(p, opts.which, opts.data) for p in run_dirs]
    baseline = read_run(baseline_dir, opts.which, opts.data) if baseline_dir is not None else None
    results = read_ablation(ablation_dir) if ablation_dir is not None else None
    every = ([baseline] if baseline else []) + runs
    label_runs(every)
    out = opts.out or ((runs[0].path if runs else ablation_dir) / "plots")  # type: ignore[operator]
    check_out(out, opts.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "plot folder"):
        drawn, skipped, notes, sources = draw_all(runs, baseline, results, every, out, opts, say)
        title = f"hiposeg plots: {runs[0].label}" + (f" vs {baseline.label}" if baseline else "") if runs else \
            f"hiposeg plots: ablation {ablation_dir}"
        page = out / PAGE_FILE
        atomic_write_text(page, render_page(title, run_table(every, sources), notes, drawn, skipped))
        atomic_write_json(out / NUMBERS_FILE, numbers_record(every, baseline, runs, drawn, skipped, sources, opts))
    return PlotSummary(out, page, drawn, skipped, time.perf_counter() - t0)


def draw_all(runs: list[Run], baseline: Run | None, results: dict[str, Any] | None, every: list[Run], out: Path,
             opts: PlotOptions, say: Callable[[str], None]
             ) -> tuple[list[pictures.Picture], dict[str, str], list[str], dict[str, str]]:
    """(pictures drawn, picture -> why not, notes for the page, run label -> where its scores came from)."""
    drawn: list[pictures.Picture] = []
    skipped: dict[str, str] = {}
    if not runs:
        drawn += timed("ablation", lambda: pictures.ablation_picture(out, opts.svg, *pictures.ablation_rows(results, None)),
                       say)
        return drawn, skipped, [], {}
    main = runs[0]
    compared = [r for r in (baseline, main) if r is not None]
    h = check_same_hierarchy(compared)
    data = Path(opts.data or main.config.data.resolved_root())
    split = opts.split or main.config.data.val_split
    no_model = [r.label for r in compared if r.checkpoint_file is None]
    no_data = None if (data / "manifest.json").is_file() else f"no prepared dataset at {data}: pass --data DIR"
    dataset = open_split(data, split, h, opts.show) if not (no_model or no_data) else None  # checks --show first
    scores, sources, notes = gather_scores(every, compared, data, split, opts.device, say, can_evaluate=not no_data)
    ctx = pictures.Context(out, opts.svg, h, every, main, baseline, scores)
    drawn += timed("curves", lambda: pictures.curves_picture(ctx), say)
    if main.label in scores:
        drawn += timed("per-class IoU", lambda: pictures.iou_pictures(ctx), say)
        drawn += timed("mIoU per level", lambda: pictures.levels_picture(ctx), say)
    else:
        skipped["per-class IoU, mIoU per level"] = f"{main.label} has no report.json and no checkpoint to evaluate"
    if all(r.label in scores and all("confusion" in lv for lv in scores[r.label]["levels"].values()) for r in compared):
        drawn += timed("confusion", lambda: pictures.confusion_pictures(ctx), say)
    else:
        skipped["confusion matrices"] = no_data or f"{', '.join(no_model)} has no checkpoint"
    if dataset is not None:
        drawn += sampled_pictures(ctx, dataset, opts, say, notes)
    else:
        why = f"{', '.join(no_model)} has no checkpoint" if no_model else no_data
        skipped.update({k: why for k in ("feature map", "prototype geometry", "gallery")})  # type: ignore[misc]
    if any(r.label in scores for r in runs) or results is not None:
        drawn += timed("ablation", lambda: pictures.ablation_picture(out, opts.svg, *pictures.ablation_rows(results, ctx)),
                       say)
    return drawn, skipped, notes, sources


def open_split(data: Path, split: str, h, show: list[str]):  # type: ignore[no-untyped-def]
    """The split the model pictures read, checked before any picture is drawn: prepared with the runs'
    hierarchy, and holding every image named with --show."""
    from hiposeg.data.dataset import open_prepared

    h_data, _ = open_prepared(data, split)
    if h_data.sha256 != h.sha256:
        raise UserError(f"{data} uses hierarchy {h_data.name!r} ({h_data.sha256[:12]}), but the runs were trained with "
                        f"{h.name!r} ({h.sha256[:12]})", hint="Pass --data DIR with the prepared dataset the runs "
                                                              "were trained on.")
    dataset = prepared_split(data, split)
    unknown = [s for s in show if s not in dataset.stems]
    if unknown:
        raise UserError(f"--show {unknown[0]}: no such image in {data / split} (e.g. {', '.join(dataset.stems[:3])})",
                        hint="Name images by their stem (the file name without its extension).")
    return dataset


def gather_scores(every: list[Run], compared: list[Run], data: Path, split: str, device: torch.device,
                  say: Callable[[str], None], can_evaluate: bool
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str]]:
    """Scores of the compared runs' checkpoints (`models.scores_of`; without the data, their report.json
    as it is), report.json of the others."""
    scores, sources, notes = {}, {}, []
    for run in every:
        if run in compared and run.checkpoint_file is not None and (can_evaluate or report_fits(run)):
            report, source = timed(f"scores of {run.label}", lambda r=run: scores_of(r, data, split, device), say)
            scores[run.label], sources[run.label] = report, source
            if source != "report.json":
                notes.append(f"{run.label}: {source}.")
        elif run.report is not None:
            scores[run.label], sources[run.label] = run.report, "report.json"
        else:
            sources[run.label] = "none (no report.json)"
    return scores, sources, notes


def sampled_pictures(ctx: pictures.Context, dataset, opts: PlotOptions, say: Callable[[str], None],  # type: ignore[no-untyped-def]
                     notes: list[str]) -> list[pictures.Picture]:
    """Feature map, prototype geometry and gallery: one pass over the split with the compared models
    (over at most --images evenly spaced images, and the images named with --show)."""
    models = [model_of(r) for r in ctx.compared]
    named = {dataset.stems.index(s) for s in opts.show}
    positions = sorted(set(evenly_spaced(len(dataset), opts.images)) | named)
    samples = timed(f"pass over {len(positions)} images of {dataset.split}", lambda: sample_split(
        models, dataset, ctx.hierarchy, positions, opts.pixels_per_class, opts.seed, opts.device), say)
    if len(positions) < len(dataset):
        notes.append(f"The feature map, prototype geometry and gallery read {len(positions)} of the {len(dataset)} "
                     f"images of {dataset.split} (evenly spaced; --images sets how many).")
    return [*timed("feature map", lambda: pictures.feature_map_picture(ctx, samples, opts.embedding, opts.seed), say),
            *timed("prototype geometry", lambda: pictures.geometry_picture(ctx, samples), say),
            *timed("gallery", lambda: pictures.gallery_picture(ctx, samples, models, dataset, opts.gallery, opts.show,
                                                               opts.device), say)]


def timed(name: str, make: Callable[[], Any], say: Callable[[str], None]) -> Any:
    """`make()`, saying how long it took. Pictures come back as a list (one or several)."""
    t0 = time.perf_counter()
    result = make()
    say(f"{name}: {time.perf_counter() - t0:.1f} s")
    return [result] if isinstance(result, pictures.Picture) else result


def run_table(every: list[Run], sources: dict[str, str]) -> list[list[str]]:
    return [[r.label, str(r.path), ",".join(r.terms), r.config.loss.schedule, str(r.config.optim.iters),
             r.checkpoint_file.name if r.checkpoint_file else "—", sources.get(r.label, "—")] for r in every]


def numbers_record(every: list[Run], baseline: Run | None, runs: list[Run], drawn: list[pictures.Picture],
                   skipped: dict[str, str], sources: dict[str, str], opts: PlotOptions) -> dict[str, Any]:
    return {"format": PLOTS_FORMAT,
            "runs": {r.label: {"path": str(r.path), "terms": r.terms, "checkpoint": str(r.checkpoint_file),
                               "scores_from": sources.get(r.label), "unreadable_log_lines": r.unreadable_lines}
                     for r in every},
            "baseline": baseline.label if baseline else None, "run": runs[0].label if runs else None,
            "options": {"checkpoint": opts.which, "pixels_per_class": opts.pixels_per_class, "images": opts.images,
                        "embedding": opts.embedding, "seed": opts.seed, "gallery": opts.gallery, "show": opts.show},
            "pictures": {p.name: {"files": [f.name for f in p.files], **p.numbers} for p in drawn},
            "skipped": skipped}
