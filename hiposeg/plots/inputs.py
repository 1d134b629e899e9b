"""What `hiposeg plot` reads: run directories and ablation directories, each checked as it is read.

A run directory (README "Checkpoints and resume") gives its configuration (config.yaml), its log
(metrics.jsonl: one row per log step, {"iter", "lr", "phase", "loss", <term>: value, ...}, and one
per evaluation, {"iter", "eval": {level: mIoU}}), its final evaluation (report.json) and its
checkpoint, whose dict holds the segmenter weights ("model"), the hierarchy and the prototype
memory ("memory": `{coarse,fine}_memory.{protos,seen}`), read by key with `weights_only=True`.
An ablation directory gives results.json (`hiposeg ablate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from hiposeg import checkpoint as ckpt_io
from hiposeg.config import TrainConfig, load_config_file, validate_config
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.rundir import CONFIG_FILE, METRICS_FILE, REPORT_FILE, checkpoint_path, read_json
from hiposeg.safeload import load_json

RESULTS_FILE = "results.json"
ABLATION_RESULTS_FORMAT = "hiposeg-ablation-results/1"


@dataclass
class Run:
    """One run directory, read once. `which`: the checkpoint the model pictures use (best or last)."""

    path: Path
    label: str
    config: TrainConfig
    metrics: list[dict[str, Any]]
    unreadable_lines: int
    report: dict[str, Any] | None
    which: str = "last"
    _checkpoint: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def checkpoint_file(self) -> Path | None:
        """checkpoints/{which}.pt, else the other one, else None (a run killed before its first checkpoint)."""
        for name in (self.which, "best" if self.which == "last" else "last"):
            if checkpoint_path(self.path, name).is_file():
                return checkpoint_path(self.path, name)
        return None

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint dict (loaded once, `weights_only=True`, every field checked)."""
        if self._checkpoint is None:
            path = self.checkpoint_file
            if path is None:
                raise UserError(f"run {self.path} has no checkpoint (checkpoints/best.pt or last.pt)",
                                hint="Plot a run that wrote a checkpoint, or resume it first.")
            self._checkpoint = ckpt_io.load(path)
        return self._checkpoint

    @cached_property
    def hierarchy(self) -> Hierarchy:
        """The run's hierarchy: from its checkpoint, else from its prepared dataset."""
        if self.checkpoint_file is not None:
            return Hierarchy.from_dict(self.checkpoint()["hierarchy"], self.checkpoint_file)
        path = self.config.data.resolved_root() / "hierarchy.json"
        if not path.is_file():
            raise UserError(f"run {self.path} has no checkpoint and its dataset ({path.parent}) is gone, so its "
                            "hierarchy is unknown", hint="Pass --data DIR with the run's prepared dataset.")
        return Hierarchy.from_file(path)

    @property
    def terms(self) -> list[str]:
        return list(self.config.loss.terms)

    @property
    def iteration(self) -> int | None:
        return int(self.checkpoint()["iteration"]) if self.checkpoint_file is not None else None

    def memory(self) -> dict[str, np.ndarray] | None:
        """The learned prototypes and which classes they hold ({"fine", "coarse", "fine_seen",
        "coarse_seen"}), None when the memory saw no class (a CE-only run)."""
        memory = self.checkpoint()["memory"]
        keys = {"fine": "fine_memory.protos", "coarse": "coarse_memory.protos",
                "fine_seen": "fine_memory.seen", "coarse_seen": "coarse_memory.seen"}
        if any(k not in memory for k in keys.values()):
            raise UserError(f"{self.checkpoint_file} holds no prototype memory entries ({', '.join(keys.values())})",
                            hint=ckpt_io.DAMAGED_HINT)
        out = {name: memory[key].float().numpy() if name in ("fine", "coarse") else memory[key].numpy().astype(bool)
               for name, key in keys.items()}
        return out if out["fine_seen"].any() or out["coarse_seen"].any() else None


def read_run(path: Path, which: str = "last", data: Path | None = None) -> Run:
    """A run directory; `data` replaces the dataset folder its configuration records."""
    path = Path(path)
    if not path.is_dir():
        kind = "a file" if path.exists() else "missing"
        raise UserError(f"run directory {path} is {kind}", hint="Give the folder `hiposeg train --out` wrote.")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{path} is not a hiposeg run directory (it has no {CONFIG_FILE})",
                        hint="Give the folder `hiposeg train --out` wrote (an ablation directory goes to --ablation).")
    config = validate_config(load_config_file(config_file), source=f"config file {config_file}")
    if data is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"root": Path(data)})})
    rows, unreadable = read_metrics(path / METRICS_FILE)
    report = read_json(path / REPORT_FILE)
    if report is not None and not (isinstance(report, dict) and isinstance(report.get("levels"), dict)):
        raise UserError(f"{path / REPORT_FILE} is not a hiposeg report (no \"levels\")",
                        hint="Evaluate the run again: `hiposeg eval RUN`.")
    return Run(path, path.name, config, rows, unreadable, report, which)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON rows of metrics.jsonl (none if it is missing) and how many lines could not be read
    (a run killed while writing leaves a torn last line)."""
    if not path.is_file():
        return [], 0
    rows, unreadable = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = load_json(line, str(path))
            except UserError:
                unreadable += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("iter"), int):
                rows.append(row)
            else:
                unreadable += 1
    return rows, unreadable


def label_runs(runs: list[Run]) -> None:
    """Each run's label is its folder name, or parent/name where two folders share a name (seed-0, ...)."""
    names = [r.path.name for r in runs]
    for r in runs:
        if names.count(r.path.name) > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"


def check_same_hierarchy(runs: list[Run]) -> Hierarchy:
    """The one hierarchy every compared run was trained with (a UserError naming two that differ)."""
    first = runs[0].hierarchy
    for r in runs[1:]:
        if r.hierarchy.sha256 != first.sha256:
            raise UserError(f"runs {runs[0].path} and {r.path} were trained with different hierarchies "
                            f"({first.name} {first.sha256[:12]}, {r.hierarchy.name} {r.hierarchy.sha256[:12]}): "
                            "their classes cannot be compared",
                            hint="Plot runs of the same dataset and hierarchy together.")
    return first


def read_ablation(path: Path) -> dict[str, Any]:
    """results.json of an ablation directory, checked for the fields the chart reads."""
    file = Path(path) / RESULTS_FILE
    if not file.is_file():
        raise UserError(f"{path} is not an ablation directory with results (no {RESULTS_FILE})",
                        hint="Give the --out folder of `hiposeg ablate` once at least one of its runs finished.")
    results = load_json(file.read_bytes(), str(file))
    if not (isinstance(results, dict) and results.get("format") == ABLATION_RESULTS_FORMAT
            and isinstance(results.get("configs"), list)):
        raise UserError(f"{file} is not a hiposeg ablation result ({ABLATION_RESULTS_FORMAT})",
                        hint="Rerun `hiposeg ablate` with the same --out to rewrite it.")
    return results
