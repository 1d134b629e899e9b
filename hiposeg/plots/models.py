"""A run's segmenter and its scores, as the pictures need them.

The segmenter is rebuilt by the one model builder (`hiposeg.models.build_segmenter`, through the
exported `arch` record of the run's configuration) and holds the checkpoint's "model" entry: no
projection head, no prototype branch. The scores are the run's report.json when it scored that very
checkpoint and carries confusion matrices; otherwise (a report from before confusion matrices were
recorded, or `--checkpoint best` of a run whose best is not its last) the checkpoint is evaluated
again on the split with `hiposeg.evaluate`, exactly as `hiposeg eval` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hiposeg.distributed import DistEnv
from hiposeg.export.common import segmenter_with_weights
from hiposeg.models import arch_record
from hiposeg.plots.inputs import Run
from hiposeg.plots.sampling import Model


def model_of(run: Run) -> Model:
    """The run's segmenter (eval mode, CPU) with its input normalisation."""
    ck = run.checkpoint()
    arch = arch_record(run.config.model, run.hierarchy.num_fine)
    segmenter = segmenter_with_weights(arch, ck["model"], run.checkpoint_file)  # type: ignore[arg-type]
    return Model(run.label, segmenter, tuple(run.config.data.mean), tuple(run.config.data.std))  # type: ignore[arg-type]


def report_fits(run: Run) -> bool:
    """Whether report.json scored the checkpoint the pictures use, with confusion matrices."""
    rep = run.report
    if rep is None or run.checkpoint_file is None:
        return False
    has_confusion = all("confusion" in lv for lv in rep["levels"].values())
    return has_confusion and rep.get("iteration") == run.iteration


def scores_of(run: Run, data: Path, split: str, device: torch.device, workers: int = 0) -> tuple[dict[str, Any], str]:
    """(report, where it came from) for the run's checkpoint (module docstring)."""
    if report_fits(run):
        return run.report, "report.json"  # type: ignore[return-value]
    from hiposeg.evaluate import eval_dataset, eval_loader, evaluate

    model = model_of(run)
    env = DistEnv(device=device)
    loader = eval_loader(eval_dataset(data, split, model.mean, model.std), env, workers=workers)
    cfg = run.config
    report = evaluate(model.segmenter.to(device), loader, env, mode=cfg.run.eval_mode, crop=cfg.data.crop,
                      iteration=run.iteration)
    return report, f"evaluated {run.checkpoint_file} on {split}: {why_evaluated(run)}"


def why_evaluated(run: Run) -> str:
    if run.report is None:
        return "the run has no report.json"
    if run.report.get("iteration") != run.iteration:
        return f"report.json scores iteration {run.report.get('iteration')}, the checkpoint is iteration {run.iteration}"
    return "its report.json was written before reports held confusion matrices"
