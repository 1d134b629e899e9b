"""The results of an ablation: mean ± std over finished seeds, Δ against the CE-only configuration
with otherwise equal settings, and the paper's Tables 5/6 beside them (results.{json,md,csv}, the
terminal table, and the `--dry-run` plan table).
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from hiposeg.ablate.plan import Plan, Record, ignored_by_ce, load_records, merge_grid, show
from hiposeg.atomic import atomic_write_json, atomic_write_text
from hiposeg.config import DEFAULT_FAMILY, LOSS_TERMS
from hiposeg.rundir import REPORT_FILE, read_json, read_status, run_state

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
# Table 9 (backbone generalization): fine mIoU without and with HiPoSeg for the other families, keyed
# by family then hierarchy. The paper names HRNet-W48; it does not say which MiT encoder its SegFormer
# uses. Its ResNet-101 rows are Table 5/6's ce and all-terms rows.
PAPER_FAMILIES: dict[str, dict[str, dict[tuple[str, ...], float]]] = {
    "hrnet": {"cityscapes": {("ce",): 80.85, _ALL: 81.39}, "pascal_part_108": {("ce",): 43.77, _ALL: 43.98},
              "ade20k": {("ce",): 38.59, _ALL: 38.95}, "mapillary_v2": {("ce",): 30.17, _ALL: 43.48}},
    "segformer": {"cityscapes": {("ce",): 80.11, _ALL: 80.63}, "pascal_part_108": {("ce",): 51.32, _ALL: 51.59},
                  "ade20k": {("ce",): 43.69, _ALL: 44.29}, "mapillary_v2": {("ce",): 44.29, _ALL: 45.04}},
}
# A row of the paper matches a configuration with its terms and the paper's stated settings.
PAPER_SETTINGS = {"loss.schedule": "sequential", "loss.sigma1": 0.25, "loss.sigma2": 1.0, "loss.memory_momentum": 0.9}


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paper_rows(hierarchy: str | None, family: str) -> tuple[str, dict[tuple[str, ...], float]] | None:
    """(table, rows by loss terms) of the paper for this hierarchy and model family, if it has any."""
    if family == DEFAULT_FAMILY:
        return PAPER.get(hierarchy)  # type: ignore[arg-type]
    rows = PAPER_FAMILIES.get(family, {}).get(hierarchy)  # type: ignore[arg-type]
    return ("Table 9", rows) if rows else None


def paper_value(hierarchy: str | None, values: dict[str, Any], experiment: dict[str, Any]) -> tuple[str, float] | None:
    """(table, fine mIoU %) of the paper's row for this configuration, if it has one."""
    found = paper_rows(hierarchy, experiment.get("model", {}).get("name", DEFAULT_FAMILY))
    if found is None:
        return None
    table, rows = found
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
                rep = read_json(d / REPORT_FILE)
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
            "notes": notes(rows)}


NOTES = ("mIoU in %, mean over finished seeds ± sample standard deviation (n − 1). Δ: difference of the means "
         "to the `ce`-only configuration with otherwise equal settings.")
PAPER_NOTE = ("Paper: fine-level mIoU from the paper's Table 5 (Cityscapes) / Table 6 (high-only = ce,fh,hh; "
              "low-only = ce,fl,ll; both = all terms), DeepLabV3+ ResNet-101 with the full recipe, and Table 9 (ce and "
              "all terms) for the hrnet (HRNet-W48) and segformer (MiT encoder not stated) families, whatever the "
              "variant trained here; shown where the terms match a row and the schedule, σ1, σ2 and m are the paper's.")


def notes(rows: Sequence[dict[str, Any]]) -> str:
    """The footnote of the tables: the paper's column is explained only when it is shown."""
    return NOTES + (" " + PAPER_NOTE if any(r["paper"] for r in rows) else "")


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
    t = Table(title=Text(title), title_justify="left", caption=Text(results["notes"]), caption_justify="left")
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
    return "\n".join(lines + ["", results["notes"], ""])


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
