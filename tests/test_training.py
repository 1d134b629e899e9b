"""The training loop end to end: what a run writes (report, metrics, checkpoints, status), its
schedule of terms, evaluations and best checkpoint, mixed precision, and the multi-process paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import fails_with, tiny_config
from faults import train_args
from hiposeg.cli import app
from hiposeg.config import build_config
from hiposeg.data.sampler import IterationSampler
from hiposeg.engine import fit, poly_lr


def load_plain(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_poly_lr_and_sampler_are_pure_functions_of_iteration():
    cfg = build_config({"optim": {"lr": 0.01, "iters": 100, "poly_power": 0.9}})
    assert poly_lr(cfg, 0) == pytest.approx(0.01)
    assert poly_lr(cfg, 50) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(cfg, 99) == pytest.approx(0.01 * 0.01 ** 0.9)
    # the stream from iteration 3 equals the tail of the stream from iteration 0
    full = IterationSampler(10, 2, 0, 1, seed=5, start_iter=0)
    late = IterationSampler(10, 2, 0, 1, seed=5, start_iter=3)
    a = [x for _, x in zip(range(20), iter(full))]
    b = [x for _, x in zip(range(14), iter(late))]
    assert a[6:] == b
    # each epoch visits every sample exactly once
    assert sorted(i for i, _ in a[:10]) == list(range(10))
    # two ranks split the global batch without overlap
    r0 = [i for _, (i, _) in zip(range(10), iter(IterationSampler(10, 1, 0, 2, 5, 0)))]
    r1 = [i for _, (i, _) in zip(range(10), iter(IterationSampler(10, 1, 1, 2, 5, 0)))]
    assert sorted(r0[:5] + r1[:5]) == list(range(10))


def test_end_to_end_train_checkpoint_eval_report(cli, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = fit(tiny_config(tiny_data, out))
    assert result.iterations == 8 and not result.interrupted
    rep = result.report
    assert set(rep["levels"]) >= {"fine", "coarse"}
    h = json.loads((tiny_data / "hierarchy.json").read_text())
    fine_names = [c["name"] for c in sorted(h["levels"][0]["classes"], key=lambda c: c["id"])]
    assert list(rep["levels"]["fine"]["IoU"]) == fine_names
    for lv in rep["levels"].values():
        assert 0.0 <= lv["mIoU"] <= 100.0 and 0.0 <= lv["pixel_accuracy"] <= 100.0
    assert json.loads((out / "report.json").read_text()) == rep
    # run directory contents
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["optim"]["iters"] == 8 and cfg["model"]["backbone"] == "resnet18"
    assert (cfg["run"]["gpus"], cfg["run"]["launcher"]) == (1, "single")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "loss" in r] == [2, 4, 6, 8]
    # lr is the poly lr of the row's last step (iteration - 1); the phase is that step's phase
    assert [r["lr"] for r in rows if "loss" in r] == pytest.approx([0.01 * (1 - i / 8) ** 0.9 for i in (1, 3, 5, 7)])
    assert [r["phase"] for r in rows if "loss" in r] == ["2-high", "4-align", "4-align", "4-align"]  # 1 in [0.6, 1.8); 3, 5, 7 >= 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert rows[-1]["eval"]["fine"] == pytest.approx(rep["levels"]["fine"]["mIoU"])
    # the sequential schedule switched the terms on (T=8: coarse from 0.6, fine from 1.8, align from 3)
    assert {"fh", "hh", "fl", "ll", "align"} <= set(rows[-2])
    # checkpoints hold plain data only
    for name in ("last", "best"):
        ck = load_plain(out / "checkpoints" / f"{name}.pt")
        assert ck["format"] == "hiposeg-checkpoint/1" and ck["iteration"] == 8
        assert ck["hierarchy"]["name"] == "synthetic"
        assert ck["memory"] and ck["projection"]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    # hiposeg eval on the run directory reproduces the final report
    r = cli.invoke(app, ["eval", str(out), "--device", "cpu", "--workers", "0", "--mode", "whole"])
    assert r.exit_code == 0, r.output
    ev = json.loads((out / "eval-val.json").read_text())
    for key in ("fine", "coarse"):
        assert ev["levels"][key]["mIoU"] == pytest.approx(rep["levels"][key]["mIoU"], abs=1e-6)
        assert ev["levels"][key]["IoU"] == pytest.approx(rep["levels"][key]["IoU"], abs=1e-6)


def test_ce_only_config_builds_no_projection_head(tiny_data, tmp_path):
    out = tmp_path / "ce"
    fit(tiny_config(tiny_data, out).model_copy(update={"loss": build_config({"loss": {"terms": ["ce"]}}).loss}))
    ck = load_plain(out / "checkpoints" / "last.pt")
    assert ck["projection"] == {}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert set(rows[-1]) & {"fh", "hh", "fl", "ll", "align"} == set()


def test_bf16_autocast_and_channels_last_train_on_the_cpu(tiny_data, tmp_path):
    """`--amp bf16 --channels-last`: the same loop under autocast; every term finite, all terms
    switched on, a report, and the prototype memory still float32 in the checkpoint."""
    out = tmp_path / "amp"
    result = fit(tiny_config(tiny_data, out, run={"amp": "bf16", "channels_last": True}))
    assert result.iterations == 8 and result.report is not None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps and all(torch.isfinite(torch.tensor(v)) for r in steps for k, v in r.items()
                         if k in ("loss", "ce", "fh", "hh", "fl", "ll", "align"))
    assert {"fh", "hh", "fl", "ll", "align"} <= set(steps[-1])
    ck = load_plain(out / "checkpoints" / "last.pt")
    assert ck["config"]["run"]["amp"] == "bf16"
    assert all(v.dtype == torch.float32 for v in ck["memory"].values() if v.is_floating_point())


def test_tensorboard_scalars_mirror_metrics_jsonl(tiny_data, tmp_path):
    """With the `tensorboard` extra (part of `dev`), train/* and val/* scalars are written beside
    metrics.jsonl, with the same values at the same iterations."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    fit(tiny_config(tiny_data, out))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["iter"] for r in steps]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps])
    assert [e.step for e in events.Scalars("train/lr")] == [r["iter"] for r in steps]
    final = [r for r in rows if "eval" in r][-1]
    (val,) = events.Scalars("val/mIoU_fine")
    assert val.step == 8 and val.value == pytest.approx(final["eval"]["fine"])


def test_periodic_evaluation_keeps_the_best_fine_miou(tiny_data, tmp_path, monkeypatch):
    """--eval-every 2 over 8 iterations: evaluations at 2, 4, 6 and the final one at 8; best.pt is the
    evaluation with the highest fine mIoU (forced here to 10, 30, 20, 25), last.pt the end."""
    import hiposeg.engine as engine

    forced = {2: 10.0, 4: 30.0, 6: 20.0, 8: 25.0}
    real = engine.evaluate

    def scripted(*args, iteration=None, **kw):
        report = real(*args, iteration=iteration, **kw)
        report["levels"]["fine"]["mIoU"] = forced[iteration]
        return report

    monkeypatch.setattr(engine, "evaluate", scripted)
    out = tmp_path / "evals"
    fit(tiny_config(tiny_data, out, run={"eval_every": 2}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["eval"]["fine"]) for r in rows if "eval" in r] == sorted(forced.items())
    best, last = load_plain(out / "checkpoints" / "best.pt"), load_plain(out / "checkpoints" / "last.pt")
    assert best["iteration"] == 4 and last["iteration"] == 8
    assert last["best"] == {"metric": "fine_mIoU", "value": 30.0, "iteration": 4}
    assert json.loads((out / "report.json").read_text())["levels"]["fine"]["mIoU"] == 25.0
    # best.pt holds the weights of iteration 4, not those of the end
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


def test_default_train_says_it_uses_the_built_in_set(cli, tmp_path, monkeypatch):
    """`hiposeg train` with no dataset: says it trains the built-in synthetic set, generates it, trains."""
    import hiposeg.data.synthetic as synthetic

    real = synthetic.generate
    monkeypatch.setattr(synthetic, "generate", lambda root, **kw: real(root, train=4, val=2, size=64, seed=0, workers=1))
    monkeypatch.chdir(tmp_path)
    r = cli.invoke(app, ["train", "--iters", "2", "--batch-size", "2", "--crop", "64x64", "--workers", "0",
                         "--device", "cpu", "--set", "model.embed_dim=16"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "dataset synthetic (the built-in default: no dataset given)" in text
    assert "generating the built-in one" in text
    assert (tmp_path / "runs" / "synthetic-resnet18" / "report.json").exists()


def test_default_synthetic_set_is_prepared_on_the_fly(tmp_path, monkeypatch):
    import hiposeg.data.synthetic as synthetic
    from hiposeg.engine import ensure_prepared

    calls = []
    real = synthetic.generate

    def small(root, **kw):
        calls.append(root)
        return real(root, train=4, val=2, size=64, seed=0, workers=1)

    monkeypatch.setattr(synthetic, "generate", small)
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"run": {"quiet": True}})
    assert cfg.data.dataset == "synthetic" and cfg.model.backbone == "resnet18"  # the CPU recipe
    ensure_prepared(cfg)
    assert calls == [Path("data/synthetic")]
    assert (tmp_path / "data" / "synthetic" / "manifest.json").exists()
    ensure_prepared(cfg)  # second time: nothing to do
    assert len(calls) == 1


def test_batch_must_split_evenly_over_processes(tiny_data, tmp_path):
    fails_with(train_args(tiny_data, tmp_path / "x", "--gpus", "2", "--batch-size", "3", iters=6), "evenly")
    fails_with(train_args(tiny_data, tmp_path / "y", "--batch-size", "1", iters=6), "1 image per process")


@pytest.mark.parametrize("extra,words", [
    (["--gpus", "2", "--batch-size", "3"], "batch size 3 does not split evenly over 2 processes"),
    (["--gpus", "2", "--batch-size", "4", "--amp", "fp16"], "--amp fp16 needs a CUDA GPU"),
    (["--gpus", "2", "--batch-size", "4", "--pretrained", "missing.pth"], "pretrained weights file missing.pth does not exist"),
    (["--batch-size", "1"], "leaves 1 image per process"),
    (["--amp", "fp16"], "--amp fp16 needs a CUDA GPU"),
])
def test_what_a_worker_would_refuse_is_refused_before_any_process_or_file(tiny_data, tmp_path, monkeypatch, extra,
                                                                           words):
    """Checked by the launching process: no worker is started (no torch SIGTERM warning), and no run
    directory, lock or .worker-error.json is left behind."""
    import hiposeg.engine as engine

    monkeypatch.setattr(engine, "spawn_reporting", lambda *a: pytest.fail("a worker was started"))
    monkeypatch.chdir(tmp_path)
    fails_with(train_args(tiny_data, tmp_path / "run", *extra), words)
    assert not (tmp_path / "run").exists()


def test_ranks_leave_the_process_group_together_only_after_a_finished_run(tiny_data, tmp_path, monkeypatch):
    """A finished worker waits at a barrier before tearing its gloo connections down (a rank that leaves
    while its peer still works can make the peer abort with SIGABRT); a failed one must not wait for
    peers that may never come."""
    import hiposeg.distributed as distributed
    import hiposeg.engine as engine

    calls: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.shutdown(together=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.shutdown()
    assert calls == ["destroy"]

    left: list[bool] = []
    monkeypatch.setattr(engine, "shutdown", lambda together=False: left.append(together))
    monkeypatch.setattr(engine, "share_cpu_cores", lambda env: None)
    cfg = tiny_config(tiny_data, tmp_path / "run")
    monkeypatch.setattr(engine, "train", lambda *a: "finished")
    assert engine.train_worker(cfg, None, "run-id") == "finished"

    def fails(*a):
        raise RuntimeError("a worker failed")

    monkeypatch.setattr(engine, "train", fails)
    with pytest.raises(RuntimeError, match="a worker failed"):
        engine.train_worker(cfg, None, "run-id")
    assert left == [True, False]


def test_a_spawned_worker_that_finished_leaves_without_interpreter_finalization(monkeypatch):
    """After its run, a spawned worker collects its garbage, flushes and `os._exit(0)`s (as a forked one
    does): native teardown at interpreter exit can abort a process whose run is complete. It prints
    its Python stacks if a fatal signal kills it (faulthandler)."""
    import hiposeg.distributed as distributed

    calls: list[str] = []

    class Exited(Exception):
        pass

    def exit_now(code):
        calls.append(f"exit {code}")
        raise Exited

    monkeypatch.setattr(distributed, "die_with_parent", lambda parent: calls.append("die with parent"))
    monkeypatch.setattr(distributed.faulthandler, "enable", lambda all_threads: calls.append("faulthandler"))
    monkeypatch.setattr(distributed.gc, "collect", lambda: calls.append("collect"))
    monkeypatch.setattr(distributed.os, "_exit", exit_now)
    monkeypatch.setattr(distributed.os, "environ", dict(os.environ))

    def run(*args):
        calls.append(f"run {distributed.os.environ['RANK']}/{distributed.os.environ['WORLD_SIZE']} {args}")

    with pytest.raises(Exited):
        distributed._spawn_entry(1, 2, 29555, 1234, run, ("cfg",))
    assert calls == ["die with parent", "faulthandler", "run 1/2 ('cfg',)", "collect", "exit 0"]

    def fails(*args):
        raise RuntimeError("the run failed")

    calls.clear()
    with pytest.raises(RuntimeError, match="the run failed"):  # left to torch's spawn wrapper: exit code 1
        distributed._spawn_entry(0, 2, 29555, 1234, fails, ())
    assert "exit 0" not in calls


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_identical(cli, tiny_data, tmp_path):
    out = tmp_path / "ddp"
    result = fit(tiny_config(tiny_data, out, optim={"iters": 4, "batch_size": 4}, run={"gpus": 2}))
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["iteration"] == 4
    assert len(status["rank_digests"]) == 2 and status["rank_digests"][0] == status["rank_digests"][1]
    recorded = yaml.safe_load((out / "config.yaml").read_text())["run"]
    assert (recorded["gpus"], recorded["launcher"]) == (2, "spawn")
    assert result.report is not None and result.report["images"] == 4
    # the ranks scored disjoint halves of the split; their summed confusion matrices must equal a
    # single-process evaluation of the saved model (dropping the all-reduce would halve the pixels)
    r = cli.invoke(app, ["eval", str(out / "checkpoints" / "last.pt"), "--device", "cpu", "--workers", "0",
                         "--mode", "whole", "--report", str(tmp_path / "single.json")])
    assert r.exit_code == 0, r.output
    single = json.loads((tmp_path / "single.json").read_text())
    for level in ("fine", "coarse"):
        a, b = result.report["levels"][level], single["levels"][level]
        assert a["pixels"] == b["pixels"] == 4 * 64 * 64, level
        assert a["IoU"] == pytest.approx(b["IoU"], abs=1e-9) and a["mIoU"] == pytest.approx(b["mIoU"], abs=1e-9)


@pytest.mark.slow
def test_torchrun_launch_line_runs_the_same_path(tiny_data, tmp_path):
    """README: `torchrun --nproc_per_node=N -m hiposeg train ...` (here 2 CPU processes, gloo)."""
    import subprocess
    import sys

    out = tmp_path / "torchrun"
    args = [a for a in train_args(tiny_data, out, iters=6) if a != "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hiposeg", *args, "--iters", "4", "--batch-size", "4"]
    scratch = tmp_path / "tmp"  # torchrun's own log folder (torchelastic_*) goes here, not into /tmp
    scratch.mkdir()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("mIoU per hierarchy level") == 1  # only rank 0 prints
    status = json.loads((out / "status.json").read_text())
    assert status["iteration"] == 4 and len(status["rank_digests"]) == 2
    assert status["rank_digests"][0] == status["rank_digests"][1]
    assert (out / "report.json").exists()
    # the run says and records how many processes trained and how they were launched (was: 1 process)
    assert proc.stderr.count("2 processes (torchrun)") == 1, proc.stderr[-3000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())["run"]
    assert (recorded["gpus"], recorded["launcher"]) == (2, "torchrun")
    assert load_plain(out / "checkpoints" / "last.pt")["config"]["run"]["launcher"] == "torchrun"
