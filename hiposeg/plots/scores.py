"""The numbers of the score pictures: per-class IoU and its gain at every level (paper Tables 7/8,
13-15), mIoU per level and the gaps between levels (Fig. 3), ablation rows, the gallery's images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.metrics import iou_per_class


@dataclass(frozen=True)
class ClassRow:
    """One class of one level: its IoU in the run and the baseline (%, None where absent) and the gain."""

    id: int
    name: str
    group: str | None  # the parent's name (None at the top level)
    run: float | None
    baseline: float | None

    @property
    def gain(self) -> float | None:
        return None if self.run is None or self.baseline is None else self.run - self.baseline


def level_key_of(report: dict[str, Any], level: str) -> str:
    """The key of `level` (a hierarchy level name) in report.json's "levels"."""
    for key, block in report["levels"].items():
        if block.get("level") == level:
            return key
    raise UserError(f"the report has no level {level!r} (it has {', '.join(report['levels'])})",
                    hint="Evaluate the run again with this hiposeg version: `hiposeg eval RUN`.")


def class_rows(h: Hierarchy, level: str, run: dict[str, Any], baseline: dict[str, Any] | None) -> list[ClassRow]:
    """Every class of `level` with its IoU in the run's (and the baseline's) report, in id order."""
    li = h.level_index(level)
    parents = h.names(h.level_names[li + 1]) if li + 1 < h.depth else None
    run_iou = run["levels"][level_key_of(run, level)]["IoU"]
    base_iou = baseline["levels"][level_key_of(baseline, level)]["IoU"] if baseline is not None else {}
    return [ClassRow(c.id, c.name, parents[c.parent] if parents is not None else None, run_iou.get(c.name),
                     base_iou.get(c.name)) for c in h.classes(level)]


def grouped_by_gain(rows: list[ClassRow]) -> list[tuple[str | None, list[ClassRow]]]:
    """Classes grouped under their parent: groups by their mean gain (largest first), classes in a
    group by gain (largest first), classes without a gain last. Without a baseline, "gain" is the IoU."""
    def key(r: ClassRow) -> float:
        v = r.gain if r.baseline is not None or r.run is None else r.run
        return -np.inf if v is None else v

    groups: dict[str | None, list[ClassRow]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    ordered = []
    for name, members in groups.items():
        members = sorted(members, key=lambda r: -key(r))
        values = [key(r) for r in members if np.isfinite(key(r))]
        ordered.append((np.mean(values) if values else -np.inf, name, members))
    ordered.sort(key=lambda t: -t[0])
    return [(name, members) for _, name, members in ordered]


def level_table(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Run label -> {level key: mIoU} plus "gap <level> - fine" for each level above fine (Fig. 3)."""
    out: dict[str, dict[str, float | None]] = {}
    for label, rep in reports.items():
        row: dict[str, float | None] = {k: lv["mIoU"] for k, lv in rep["levels"].items()}
        fine = row.get("fine")
        for k, v in list(row.items()):
            if k != "fine":
                row[f"gap {k} - fine"] = None if v is None or fine is None else v - fine
        out[label] = row
    return out


def confusion_of(report: dict[str, Any], level_key: str) -> np.ndarray | None:
    """The (K, K+1) confusion matrix a report holds for a level, None for reports written before they
    held one."""
    block = report["levels"][level_key]
    if "confusion" not in block:
        return None
    mat = np.asarray(block["confusion"], dtype=np.int64)
    k = block["num_classes"]
    if mat.shape != (k, k + 1):
        raise UserError(f"the report's {level_key} confusion matrix is {mat.shape[0]}x{mat.shape[1]}, expected "
                        f"{k}x{k + 1}", hint="Evaluate the run again: `hiposeg eval RUN`.")
    return mat


def row_normalised(mat: np.ndarray) -> np.ndarray:
    """Rows (ground truth) divided by their totals; rows of absent classes stay 0."""
    totals = mat.sum(axis=1, keepdims=True)
    return np.divide(mat, totals, out=np.zeros(mat.shape, dtype=np.float64), where=totals > 0)


def iou_from_confusion(mat: np.ndarray) -> np.ndarray:
    """Per-class IoU in % (NaN where absent): the same rule as report.json (`metrics.iou_per_class`)."""
    return iou_per_class(mat) * 100


def hierarchy_order(h: Hierarchy, level: str) -> tuple[list[int], list[tuple[str, int, int]]]:
    """Class ids of `level` grouped by parent (parents by id), and the (parent, first, end) positions
    of each group in that order: the blocks outlined on a hierarchy-ordered matrix."""
    li = h.level_index(level)
    if li + 1 == h.depth:
        return [c.id for c in h.classes(level)], []
    up = h.level_names[li + 1]
    order, blocks = [], []
    for parent, children in h.children(up).items():
        blocks.append((h.names(up)[parent], len(order), len(order) + len(children)))
        order += children
    return order, blocks


# ==========================================================================================
# Ablation rows and the gallery's choice
# ==========================================================================================


def ablation_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's rows of an ablation's results.json: name, fine/coarse mean ± std (n), paper value."""
    rows = []
    for c in results["configs"]:
        try:
            rows.append({"config": str(c["config"]),
                         **{lv: {"mean": c[lv]["mean"], "std": c[lv]["std"], "n": c[lv]["n"]} for lv in ("fine", "coarse")},
                         "paper": (c.get("paper") or {}).get("fine_mIoU")})
        except (KeyError, TypeError):
            raise UserError(f"ablation results row {c!r:.80} lacks the fields fine/coarse {{mean, std, n}}",
                            hint="Rerun `hiposeg ablate` with the same --out to rewrite results.json.") from None
    return rows


def runs_as_ablation(reports: dict[str, dict[str, Any]], paper: dict[str, float | None]) -> list[dict[str, Any]]:
    """Ablation rows from single runs (one seed each: no std), for a chart without `hiposeg ablate`."""
    def stat(rep: dict[str, Any], lv: str) -> dict[str, Any]:
        m = rep["levels"].get(lv, {}).get("mIoU")
        return {"mean": m, "std": None, "n": int(m is not None)}

    return [{"config": label, "fine": stat(rep, "fine"), "coarse": stat(rep, "coarse"), "paper": paper.get(label)}
            for label, rep in reports.items()]


def choose_gallery(stems: list[str], run_acc: np.ndarray, base_acc: np.ndarray | None, n: int,
                   named: list[str]) -> list[tuple[str, str]]:
    """(stem, why) of the gallery's images: the named ones, else the `n` largest improvements of the
    run's fine pixel accuracy over the baseline's then the `n` largest regressions (without a
    baseline, or where no image's accuracy differs: the run's `n` worst and `n` best images). Ties go
    to the earlier stem."""
    if named:
        unknown = [s for s in named if s not in stems]
        if unknown:
            raise UserError(f"--show {unknown[0]}: no such image among the {len(stems)} plotted images of the split "
                            f"(e.g. {', '.join(stems[:3])})", hint="Name images by their stem (file name without extension).")
        return [(s, "named") for s in named]
    if base_acc is not None:
        gain = run_acc - base_acc
        top, bottom = extremes(gain, n)
        chosen = [(stems[i], "largest improvement") for i in top if gain[i] > 0]
        chosen += [(stems[i], "largest regression") for i in bottom if gain[i] < 0]
        if chosen:
            return chosen
    top, bottom = extremes(run_acc, n)
    return [(stems[i], "worst") for i in bottom] + [(stems[i], "best") for i in top]


def extremes(score: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    """Positions of the `n` highest scores and of the `n` lowest others (ties: earlier positions first)."""
    position = np.arange(len(score))
    top = [int(i) for i in np.lexsort((position, -score))[:n]]
    return top, [int(i) for i in np.lexsort((position, score)) if int(i) not in top][:n]
