"""The numbers of the training-curves picture: series from metrics.jsonl and the schedule's phases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hiposeg.config import LOSS_TERMS, PHASE_GROUPS, TrainConfig, phase_starts

# What a log row may hold besides "iter", "lr", "phase" and "it_per_s": the total and every term
# (align also as its two parts, eq. 13).
LOSS_KEYS: tuple[str, ...] = ("loss", *LOSS_TERMS, "align_in", "align_out")
PHASE_LABELS = ("CE", "+ high", "+ low", "+ align")


@dataclass(frozen=True)
class Series:
    iters: np.ndarray
    values: np.ndarray


def last_per_iteration(rows: list[dict[str, Any]], key: str, value=lambda row, key: row.get(key)) -> Series:
    """(iteration, value) of the rows that hold `key`, sorted; where an iteration was logged twice
    (a run resumed from a checkpoint older than its log) the later row wins."""
    latest: dict[int, float] = {}
    for row in rows:
        v = value(row, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            latest[row["iter"]] = float(v)
    its = np.array(sorted(latest), dtype=np.int64)
    return Series(its, np.array([latest[i] for i in its], dtype=np.float64))


def training_series(rows: list[dict[str, Any]]) -> dict[str, Series]:
    """Every loss key and "lr" that the log holds, by name (empty series left out)."""
    out = {key: last_per_iteration(rows, key) for key in (*LOSS_KEYS, "lr")}
    return {k: s for k, s in out.items() if len(s.iters)}


def eval_series(rows: list[dict[str, Any]]) -> dict[str, Series]:
    """Validation mIoU per level key ("fine", "coarse", ...) from the evaluation rows."""
    levels = sorted({lv for r in rows if isinstance(r.get("eval"), dict) for lv in r["eval"]},
                    key=lambda k: (k != "fine", k != "coarse", k))
    out = {lv: last_per_iteration(rows, lv, lambda row, key: (row.get("eval") or {}).get(key)) for lv in levels}
    return {k: s for k, s in out.items() if len(s.iters)}


def phase_spans(config: TrainConfig) -> list[tuple[int, int, str]]:
    """(first, end, label) iteration spans of the sequential schedule in completed iterations, one per
    phase that switches a configured term on; none for a joint schedule or a CE-only run."""
    loss = config.loss
    terms = set(loss.terms)
    if loss.schedule == "joint" or terms == {"ce"}:
        return []
    total = config.optim.iters
    starts = phase_starts(loss.schedule, loss.phases, total)
    labels: dict[int, list[str]] = {0: [PHASE_LABELS[0]]}
    for start, group, label in zip(starts, PHASE_GROUPS, PHASE_LABELS[1:]):
        if group & terms:  # phases that start together share one span: "+ high + low"
            labels.setdefault(start, []).append(label)
    bounds = sorted(labels.items())
    ends = [b for b, _ in bounds[1:]] + [total]
    return [(start, min(end, total), " ".join(names)) for (start, names), end in zip(bounds, ends) if min(end, total) > start]
