"""Reliability: numerical faults in training.

* A NaN or inf injected into one loss term (the criterion is wrapped from outside with
  monkeypatch) stops `hiposeg train` with exit code 2 and a message naming the iteration and the
  term; the last checkpoint written before the fault is left untouched.
* Batches without a single labelled pixel, and batches in which a whole coarse class (with all its
  fine children) is absent, train on with every loss term finite, end to end on real files.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import fails_with, tiny_config
from faults import load_checkpoint, one_thread, temp_files, train_args  # noqa: F401
from hiposeg.prototypes import HiPoSegCriterion

pytestmark = pytest.mark.usefixtures("one_thread")


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("term, value", [("fh", math.nan), ("ce", math.inf)])
def test_non_finite_loss_stops_naming_iteration_and_term(tiny_data, tmp_path, monkeypatch, term, value):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    real_forward = HiPoSegCriterion.forward
    seen: dict[str, str] = {}

    def forward_with_fault(self, logits, embeddings, target, iteration, **kw):  # type: ignore[no-untyped-def]
        loss, terms = real_forward(self, logits, embeddings, target, iteration, **kw)
        if iteration == 3:  # iterations 0-2 done, checkpoint of iteration 2 on disk
            seen["sha"] = sha256(last)
            bad = torch.tensor(value)
            terms = {**terms, term: bad}
            loss = loss + bad
        return loss, terms

    monkeypatch.setattr(HiPoSegCriterion, "forward", forward_with_fault)
    shown = "nan" if math.isnan(value) else "inf"
    fails_with(train_args(tiny_data, out, iters=6, ckpt_every=2), f"non-finite at iteration 3 in term {term}",
               f"{term}={shown}", f"The last good checkpoint is kept: {last}")
    monkeypatch.undo()
    assert sha256(last) == seen["sha"], "the last good checkpoint was rewritten after the fault"
    ck = load_checkpoint(last)
    assert ck["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not temp_files(last.parent)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "diverged" and f"iteration 3 in term {term}" in status["error"]


def blank(path: Path, keep: tuple[int, ...] = ()) -> None:
    """Set every pixel of a label map to ignore (255), except the classes in `keep`."""
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), np.where(np.isin(lab, keep), lab, 255).astype(np.uint8))


@pytest.mark.slow
def test_all_ignore_batches_and_absent_classes_train_without_nan(tiny_data, tmp_path):
    from hiposeg.data.dataset import PreparedDataset
    from hiposeg.data.sampler import IterationSampler
    from hiposeg.engine import fit

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    stems = PreparedDataset(data, "train", levels=("fine",)).stems
    cfg = tiny_config(data, tmp_path / "run", loss={"schedule": "joint"},  # every term active from the first step
                      optim={"iters": 6}, run={"ckpt_every": 100, "log_every": 1})
    # Which images each step sees is a pure function of (seed, iteration): pick the batches.
    order = iter(IterationSampler(len(stems), 2, 0, 1, cfg.run.seed, 0))
    batches = [[next(order)[0] for _ in range(2)] for _ in range(cfg.optim.iters)]
    # step -> fine classes kept: none (all ignore), or sky only: one coarse class, and of its fine
    # classes only one, so on first sight its fine and coarse prototypes coincide (delta = 0 in eq. 11)
    plan = {0: (), 1: (0,), 3: ()}
    for step, keep in plan.items():
        for i in batches[step]:
            for level in ("fine", "coarse"):  # coarse background = 0: sky/ground's parent
                blank(data / "train" / level / f"{stems[i]}.png", keep if level == "fine" else (0,) * bool(keep))

    result = fit(cfg)
    assert result.iterations == 6 and not result.interrupted
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["iter"] - 1: r for r in rows if "loss" in r}
    assert sorted(steps) == list(range(6))
    for step, row in steps.items():
        assert {"ce", "fh", "hh", "fl", "ll", "align"} <= set(row), row
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), (step, row)
    for step in (0, 3):  # no labelled pixel: no cross-entropy and no feature-prototype term
        assert steps[step]["ce"] == 0.0 and steps[step]["fh"] == 0.0 and steps[step]["fl"] == 0.0, steps[step]
    assert steps[1]["hh"] == 0.0  # one coarse class present and none remembered: no pair to repel
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    for part in ("model", "projection", "memory"):
        assert all(torch.isfinite(v).all() for v in ck[part].values() if v.is_floating_point()), part
