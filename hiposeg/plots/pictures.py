"""Each kind of picture from the inputs to its files: gather its numbers, draw, save, and describe it
(title, what it shows, the numbers behind it) for the HTML page and numbers.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiposeg.hierarchy import Hierarchy
from hiposeg.palette import level_palette
from hiposeg.plots import curves, draw, embed, geometry, scores
from hiposeg.plots.draw.ablation import draw_ablation
from hiposeg.plots.draw.confusion import draw_confusion
from hiposeg.plots.draw.curves import RunCurves, draw_curves
from hiposeg.plots.draw.featuremap import draw_feature_map
from hiposeg.plots.draw.gallery import GalleryRow, draw_gallery
from hiposeg.plots.draw.geometry import draw_geometry
from hiposeg.plots.draw.iou import draw_class_iou
from hiposeg.plots.draw.levels import draw_levels
from hiposeg.plots.inputs import Run
from hiposeg.plots.sampling import Model, Samples, class_means


@dataclass
class Picture:
    """One picture written: its files, and what the page says about it."""

    name: str
    title: str
    caption: str
    files: list[Path]
    numbers: dict[str, Any] = field(default_factory=dict)
    table: tuple[list[str], list[list[str]]] | None = None


@dataclass
class Context:
    """What every picture reads: the output folder, the runs (baseline first), their scores."""

    out: Path
    svg: bool
    hierarchy: Hierarchy
    runs: list[Run]
    main: Run
    baseline: Run | None
    scores: dict[str, dict[str, Any]]  # run label -> report (IoU, confusion)

    @property
    def compared(self) -> list[Run]:
        return [r for r in (self.baseline, self.main) if r is not None]

    def colours(self, level: str) -> np.ndarray:
        return level_palette(self.hierarchy, level, "families")

    def group_colours(self, level: str) -> dict[str, np.ndarray]:
        """Parent name -> colour, for the parents of `level` (none at the top level)."""
        h = self.hierarchy
        li = h.level_index(level)
        if li + 1 == h.depth:
            return {}
        up = h.level_names[li + 1]
        return dict(zip(h.names(up), self.colours(up)))


def pct(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"


# ==========================================================================================
# 1-3, 6, 8: from logs and reports
# ==========================================================================================


def curves_picture(ctx: Context) -> Picture:
    runs = [RunCurves(r.label, curves.training_series(r.metrics), curves.eval_series(r.metrics)) for r in ctx.runs]
    spans = curves.phase_spans(ctx.main.config)
    fig = draw_curves(runs, spans)
    final = {r.label: {k: float(s.values[-1]) for k, s in r.train.items()} for r in runs}
    return Picture("curves", "Training curves", (
        "Each loss term (unweighted, as logged), the total of eq. 14 and the learning rate per logged step, and the "
        f"validation mIoU at each evaluation. Shaded: the phases of {ctx.main.label}'s schedule (CE alone, then the "
        "high-level, low-level and alignment terms switching on)."), draw.save(fig, ctx.out, "curves", ctx.svg),
        {"final_logged": final, "phases": [list(s) for s in spans]})


def iou_pictures(ctx: Context) -> list[Picture]:
    h, base = ctx.hierarchy, ctx.baseline
    out = []
    for level in h.levels_above_fine:
        rows = scores.class_rows(h, level, ctx.scores[ctx.main.label], ctx.scores[base.label] if base else None)
        groups = scores.grouped_by_gain(rows)
        key = scores.level_key_of(ctx.scores[ctx.main.label], level)
        title = f"IoU per class — {key} level ({level})" + (f": {ctx.main.label} vs {base.label}" if base else "")
        fig = draw_class_iou(groups, title, ctx.main.label, base.label if base else None, ctx.group_colours(level))
        gains = [r.gain for r in rows if r.gain is not None]
        numbers = {"classes": len(rows), "gained": sum(g > 0 for g in gains), "lost": sum(g < 0 for g in gains),
                   "mean_gain": float(np.mean(gains)) if gains else None,
                   "per_class": {r.name: {"parent": r.group, "run": r.run, "baseline": r.baseline, "gain": r.gain}
                                 for r in rows}}
        header = ["class", "parent", *([base.label] if base else []), ctx.main.label, *(["gain"] if base else [])]
        table = [[r.name, r.group or "", *([pct(r.baseline)] if base else []), pct(r.run),
                  *([("—" if r.gain is None else f"{r.gain:+.2f}")] if base else [])] for _, m in groups for r in m]
        caption = ("Per-class IoU (%) — the form of the paper's Tables 7/8 and 13–15. Classes are grouped under their "
                   "parent (bands in the parent's colour); groups and classes are sorted by "
                   + ("gain: left, baseline (open) and run (filled) IoU; right, the gain in points (blue: gain, "
                      "vermillion: loss)." if base else "IoU."))
        out.append(Picture(f"iou-{key}", title, caption, draw.save(fig, ctx.out, f"iou-{key}", ctx.svg), numbers,
                           (header, table)))
    return out


def levels_picture(ctx: Context) -> Picture:
    reports = {label: rep for label, rep in ctx.scores.items()}
    table = scores.level_table(reports)
    keys = list(ctx.scores[ctx.main.label]["levels"])
    names = {k: ctx.scores[ctx.main.label]["levels"][k]["level"] for k in keys}
    fig = draw_levels(table, keys, names)
    header = ["run", *keys, *[f"gap {k} − fine" for k in keys[1:]]]
    rows = [[label, *(pct(t.get(k)) for k in keys), *(pct(t.get(f"gap {k} - fine")) for k in keys[1:])]
            for label, t in table.items()]
    return Picture("levels", "mIoU at every level", (
        "mIoU (%) of each run at the fine level and every level above it (coarse predictions are the fine argmax "
        "mapped through the hierarchy), as the paper's Fig. 3; written above each run: the gap of each level to the "
        "fine level. A hierarchy-consistent model has a smaller gap."), draw.save(fig, ctx.out, "levels", ctx.svg),
        {"mIoU": table}, (header, rows))


def confusion_pictures(ctx: Context) -> list[Picture]:
    h = ctx.hierarchy
    out = []
    for key, level in (("fine", h.fine_level), ("coarse", h.coarse_level)):
        order, blocks = scores.hierarchy_order(h, level)
        mats = {}
        for run in ctx.compared:
            rep = ctx.scores[run.label]
            mat = scores.confusion_of(rep, scores.level_key_of(rep, level))
            mats[run.label] = scores.row_normalised(mat)[:, : mat.shape[0]]  # type: ignore[index]
        title = f"Confusion, {key} level ({level}), rows normalised"
        fig = draw_confusion(mats, order, blocks, h.names(level), title)
        sibling = {label: within_block_share(m, h, level) for label, m in mats.items()}
        out.append(Picture(f"confusion-{key}", title, (
            "Rows: ground-truth class, columns: predicted class, each row divided by the class's pixels; classes "
            "ordered by the hierarchy, parents' blocks outlined. Off-diagonal mass inside a block is confusion "
            "between siblings, outside it confusion across parents."),
            draw.save(fig, ctx.out, f"confusion-{key}"), {"errors_between_siblings_share": sibling}))
    return out


def within_block_share(mat: np.ndarray, h: Hierarchy, level: str) -> float | None:
    """Of the row-normalised off-diagonal mass, the share that stays inside the parent's block."""
    li = h.level_index(level)
    if li + 1 == h.depth:
        return None
    pi = h.ancestor_lut(level, h.level_names[li + 1])
    off = mat * (1 - np.eye(len(mat)))
    total = off.sum()
    return float((off * (pi[:, None] == pi[None, :])).sum() / total) if total > 0 else None


def ablation_rows(results: dict[str, Any] | None, ctx: Context | None) -> tuple[list[dict[str, Any]], str, str]:
    """(rows, where they come from, title): an ablation's results.json, else the plotted runs' scores."""
    if results is not None:
        return (scores.ablation_rows(results), "the ablation's results.json",
                "Ablation" + (f" on {results['hierarchy']}" if results.get("hierarchy") else ""))
    from hiposeg.ablate.results import paper_value

    assert ctx is not None
    paper = {}
    for r in ctx.runs:
        match = paper_value(ctx.hierarchy.name, {"loss.terms": r.terms}, r.config.to_plain())
        paper[r.label] = match[1] if match else None
    rows = scores.runs_as_ablation({r.label: ctx.scores[r.label] for r in ctx.runs if r.label in ctx.scores}, paper)
    return rows, "the plotted runs (one seed each)", f"Runs compared on {ctx.hierarchy.name}"


def ablation_picture(out: Path, svg: bool, rows: list[dict[str, Any]], source: str, title: str) -> Picture:
    fig = draw_ablation(rows, title)
    header = ["configuration", "fine mIoU", "coarse mIoU", "paper fine mIoU"]
    table = [[r["config"], *(pct(r[lv]["mean"]) + (f" ± {r[lv]['std']:.2f}" if r[lv]["std"] is not None else "")
                             + f" (n={r[lv]['n']})" for lv in ("fine", "coarse")), pct(r["paper"])] for r in rows]
    return Picture("ablation", title, (
        f"Fine and coarse mIoU per configuration from {source}: the mean over finished seeds, the error bar one "
        "sample standard deviation; diamonds: the paper's fine-level mIoU (Tables 5/6, ResNet-101, full recipe) "
        "where the configuration matches a row of the paper."), draw.save(fig, out, "ablation", svg),
        {"rows": rows}, (header, table))


# ==========================================================================================
# 4, 5, 7: from the pass over the split
# ==========================================================================================


def feature_map_picture(ctx: Context, samples: Samples, method: str, seed: int) -> Picture:
    h = ctx.hierarchy
    maps, titles, agreement = {}, {}, {}
    for run in ctx.compared:
        feats = samples.features[run.label]
        maps[run.label] = embed.embed(feats, method, seed)
        agreement[run.label] = embed.neighbour_agreement(feats, samples.labels, h.fine_to_coarse)
        a = agreement[run.label]
        titles[run.label] = f"{run.label}\n{a['k']}-NN agreement: fine {a['fine']:.2f}, coarse {a['coarse']:.2f}"
    _, blocks = scores.hierarchy_order(h, h.fine_level)
    order, _ = scores.hierarchy_order(h, h.fine_level)
    groups = [(name, order[a:b]) for name, a, b in blocks] or [(h.fine_level, order)]
    fig = draw_feature_map(maps, samples.labels, titles, h.names(h.fine_level), ctx.colours(h.fine_level), groups,
                           {"tsne": "t-SNE", "pca": "PCA", "umap": "UMAP"}[method])
    counts = np.bincount(samples.labels, minlength=h.num_fine)
    return Picture("featuremap", "Feature space", (
        f"{len(samples.labels):,} pixels of the stride-4 decoder feature, sampled per fine class (at most "
        f"{int(counts.max()) if len(counts) else 0} each, balanced, fixed seed) from {len(samples.stems)} images, "
        f"embedded in 2-D with {method} (the paper's Fig. 4), each model on the same pixels. Colours: the fine "
        "classes, children of one parent in one hue family. Above each map: the share of each pixel's nearest "
        "neighbours in the full feature space that hold its fine class / a class of its parent."),
        draw.save(fig, ctx.out, "featuremap"), {"method": method, "pixels": int(len(samples.labels)),
                                                "pixels_per_class": dict(zip(h.names(h.fine_level), counts.tolist())),
                                                "neighbour_agreement": agreement})


def geometry_picture(ctx: Context, samples: Samples) -> Picture:
    h = ctx.hierarchy
    pi = h.fine_to_coarse
    sets: dict[str, geometry.Geometry] = {}
    for run in ctx.compared:
        fine, fine_ok, coarse, coarse_ok = class_means(samples.class_sums[run.label], samples.class_counts, pi,
                                                       h.num_coarse)
        fine, coarse = geometry.centred(fine, fine_ok, coarse)
        sets[f"{run.label} — class means of the decoder feature"] = geometry.geometry(fine, coarse, fine_ok,
                                                                                     coarse_ok, pi)
        memory = run.memory()
        if memory is not None:
            sets[f"{run.label} — learned prototypes (memory)"] = geometry.geometry(
                memory["fine"], memory["coarse"], memory["fine_seen"], memory["coarse_seen"], pi)
    order, blocks = scores.hierarchy_order(h, h.fine_level)
    fig = draw_geometry(sets, order, blocks, h.names(h.fine_level), h.names(h.coarse_level), pi)
    numbers = {"sets": {title: g.numbers() for title, g in sets.items()}}
    header = ["prototypes", "nearest coarse = parent", "within-parent cos", "between-parent cos", "within − between"]
    rows = [[t, f"{g.parent_hits}/{g.parent_counted}", pct(g.within), pct(g.between), pct(g.gap)]
            for t, g in sets.items()]
    return Picture("geometry", "Prototype geometry", (
        "Cosine similarity of fine class prototypes (left; classes grouped by parent, blocks outlined) and of fine "
        "to coarse prototypes (right; box: the parent, dot: the most similar coarse prototype). Class means are "
        "means of the decoder feature over every labelled pixel of the plotted images, centred on their average "
        "(the feature follows a ReLU) — computed the same way for every run; learned prototypes are the run's "
        "memory (eq. 15) in the projection space. A hierarchical space has warm diagonal blocks, a positive "
        "within − between gap, and every dot in its box (for class means a class's pixels are part of its "
        "parent's mean, so compare that count between runs)."), draw.save(fig, ctx.out, "geometry"), numbers,
        (header, rows))


def gallery_picture(ctx: Context, samples: Samples, models: list[Model], dataset, n: int, named: list[str],
                    device: torch.device) -> Picture:
    h = ctx.hierarchy
    base = ctx.baseline
    chosen = scores.choose_gallery(samples.stems, samples.accuracy[ctx.main.label]["fine"],
                                   samples.accuracy[base.label]["fine"] if base else None, n, named)
    pi = np.append(h.fine_to_coarse, -1)
    rows = []
    for stem, why in chosen:
        item = dataset[dataset.stems.index(stem)]
        truth = item["fine"].numpy()
        truth = np.where((truth >= 0) & (truth < h.num_fine), truth, h.num_fine)
        preds = {}
        with torch.no_grad():
            for m in models:
                fine = m.segmenter(m.normalise(item["image"]).to(device))[0].argmax(0).cpu().numpy()
                preds[m.label] = {"fine": fine, "coarse": pi[fine]}
        i = samples.stems.index(stem)
        note = "fine acc. " + " → ".join(f"{pct(samples.accuracy[m.label]['fine'][i])}" for m in models)
        rows.append(GalleryRow(stem, why, item["image"].permute(1, 2, 0).numpy(), {"fine": truth, "coarse": pi[truth]},
                               preds, note))
    palettes = {"fine": ctx.colours(h.fine_level), "coarse": ctx.colours(h.coarse_level)}
    legend = {k: list(zip(h.names(lv), palettes[k])) for k, lv in (("fine", h.fine_level), ("coarse", h.coarse_level))}
    fig = draw_gallery(rows, palettes, {"fine": h.fine_level, "coarse": h.coarse_level}, legend)
    return Picture("gallery", "Qualitative results", (
        "Image, ground truth and each model's prediction at the fine and the coarse level (the paper's Figs. 5–7); "
        "pixels a prediction gets wrong are darkened and outlined in white (black: ignore). Images: "
        + gallery_reason(chosen, ctx.main.label, base.label if base else None)),
        draw.save(fig, ctx.out, "gallery"), {"images": [{"stem": s, "why": w} for s, w in chosen]})


def gallery_reason(chosen: list[tuple[str, str]], run: str, baseline: str | None) -> str:
    """How the gallery's images were chosen, for its caption."""
    whys = {w for _, w in chosen}
    if whys == {"named"}:
        return "named with --show."
    if whys & {"largest improvement", "largest regression"}:
        return f"the largest improvements and regressions of fine pixel accuracy of {run} over {baseline}."
    return f"{run}'s worst and best images by fine pixel accuracy" + (
        f" (no image's accuracy differs between {run} and {baseline})." if baseline else ".")
