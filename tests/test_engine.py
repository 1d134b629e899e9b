"""End-to-end behaviour of the training engine and `hiposeg train` / `hiposeg eval`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from faults import StopAfter
from hiposeg import checkpoint
from hiposeg.cli import app
from hiposeg.config import build_config
from hiposeg.engine import IterationSampler, fit, poly_lr

runner = CliRunner()


def tiny_cfg(data: Path, out: Path, **run):
    layers = {
        "data": {"dataset": "custom", "root": str(data), "crop": (64, 64), "workers": 0, "scale_range": (0.75, 1.25)},
        "model": {"backbone": "resnet18", "output_stride": 16, "embed_dim": 32},
        "optim": {"iters": 8, "batch_size": 2, "lr": 0.01},
        "run": {"out": str(out), "device": "cpu", "deterministic": True, "ckpt_every": 4, "log_every": 2,
                "quiet": True, "eval_mode": "whole", **run},
    }
    return build_config(layers)


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--iters", "6", "--batch-size", "2", "--crop", "64x64",
            "--backbone", "resnet18", "--output-stride", "16", "--workers", "0", "--device", "cpu", "--quiet",
            "--set", "model.embed_dim=32", *extra]


def load_plain(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------


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


def test_end_to_end_train_checkpoint_eval_report(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = fit(tiny_cfg(tiny_data, out))
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
    r = runner.invoke(app, ["eval", str(out), "--device", "cpu", "--workers", "0", "--mode", "whole"])
    assert r.exit_code == 0, r.output
    ev = json.loads((out / "eval-val.json").read_text())
    for key in ("fine", "coarse"):
        assert ev["levels"][key]["mIoU"] == pytest.approx(rep["levels"][key]["mIoU"], abs=1e-6)
        assert ev["levels"][key]["IoU"] == pytest.approx(rep["levels"][key]["IoU"], abs=1e-6)


def test_ce_only_config_builds_no_projection_head(tiny_data, tmp_path):
    out = tmp_path / "ce"
    fit(tiny_cfg(tiny_data, out).model_copy(update={"loss": build_config({"loss": {"terms": ["ce"]}}).loss}))
    ck = load_plain(out / "checkpoints" / "last.pt")
    assert ck["projection"] == {}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert set(rows[-1]) & {"fh", "hh", "fl", "ll", "align"} == set()


def test_resume_after_interruption_equals_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    import hiposeg.engine as engine

    full = fit(tiny_cfg(tiny_data, tmp_path / "full"))
    assert full.iterations == 8

    monkeypatch.setattr(engine, "StopSignal", lambda: StopAfter(5))
    part = fit(tiny_cfg(tiny_data, tmp_path / "part"))
    assert part.interrupted and part.iterations == 5
    assert json.loads((tmp_path / "part" / "status.json").read_text())["state"] == "interrupted"
    monkeypatch.undo()

    done = fit(tiny_cfg(tiny_data, tmp_path / "part"), resume=tmp_path / "part" / "checkpoints" / "last.pt")
    assert done.iterations == 8 and not done.interrupted
    a = load_plain(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_plain(tmp_path / "part" / "checkpoints" / "last.pt")
    for part_name in ("model", "projection", "memory"):
        assert a[part_name].keys() == b[part_name].keys()
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), f"{part_name}.{k} differs after resume"
    assert done.report["levels"]["fine"]["mIoU"] == pytest.approx(full.report["levels"]["fine"]["mIoU"])


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_identical(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    cfg = tiny_cfg(tiny_data, out, gpus=2)
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"iters": 4, "batch_size": 4})})
    result = fit(cfg)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["iteration"] == 4
    assert len(status["rank_digests"]) == 2 and status["rank_digests"][0] == status["rank_digests"][1]
    assert result.report is not None and result.report["images"] == 4
    # the ranks scored disjoint halves of the split; their summed confusion matrices must equal a
    # single-process evaluation of the saved model (dropping the all-reduce would halve the pixels)
    r = runner.invoke(app, ["eval", str(out / "checkpoints" / "last.pt"), "--device", "cpu", "--workers", "0",
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
    args = [a for a in cli_args(tiny_data, out) if a != "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hiposeg", *args, "--iters", "4", "--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("mIoU per hierarchy level") == 1  # only rank 0 prints
    status = json.loads((out / "status.json").read_text())
    assert status["iteration"] == 4 and len(status["rank_digests"]) == 2
    assert status["rank_digests"][0] == status["rank_digests"][1]
    assert (out / "report.json").exists()


def test_config_file_layers_under_flags_and_set(tiny_data, tmp_path):
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("optim:\n  iters: 3\n  lr: 0.005\nloss:\n  tau: 0.2\n  terms: [ce, fh, hh]\n")
    out = tmp_path / "cfgrun"
    args = [a for a in cli_args(tiny_data, out) if a not in ("--iters", "6")] + ["--config", str(cfg_file),
                                                                               "--set", "loss.tau=0.3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["iters"] == 3 and saved["optim"]["lr"] == 0.005   # from the file
    assert saved["loss"]["tau"] == 0.3                                       # --set beats the file
    assert saved["loss"]["terms"] == ["ce", "fh", "hh"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    r = runner.invoke(app, cli_args(tiny_data, tmp_path / "b") + ["--config", str(bad)])
    assert r.exit_code == 2 and "bad.yaml" in r.output and "Traceback" not in r.output


def test_cli_train_then_eval_predictions_match_model(tiny_data, tmp_path):
    out = tmp_path / "cli"
    r = runner.invoke(app, cli_args(tiny_data, out))
    assert r.exit_code == 0, r.output
    assert "mIoU" in r.output and str(out) in r.output
    preds = tmp_path / "preds"
    r = runner.invoke(app, ["eval", str(out), "--device", "cpu", "--workers", "0", "--mode", "whole",
                            "--save-predictions", str(preds), "--report", str(tmp_path / "model.json")])
    assert r.exit_code == 0, r.output
    assert len(list(preds.glob("*.png"))) == 4
    r = runner.invoke(app, ["eval", "--predictions", str(preds), "--data", str(tiny_data),
                            "--report", str(tmp_path / "preds.json")])
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "model.json").read_text())
    b = json.loads((tmp_path / "preds.json").read_text())
    assert a["levels"] == b["levels"]


def test_existing_run_needs_resume_and_resume_rejects_changed_settings(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, cli_args(tiny_data, out)).exit_code == 0
    r = runner.invoke(app, cli_args(tiny_data, out))
    assert r.exit_code == 2 and "--resume" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train", "--resume", "last", "--out", str(out), "--lr", "0.5", "--quiet"])
    assert r.exit_code == 2 and "optim.lr" in r.output
    r = runner.invoke(app, ["train", "--resume", "last", "--out", str(out), "--seed", "7", "--quiet"])
    assert r.exit_code == 2 and "run.seed" in r.output  # another seed is another data stream
    r = runner.invoke(app, ["train", "--resume", "last", "--out", str(tmp_path / "nothing"), "--quiet"])
    assert r.exit_code == 2 and "nothing to resume" in r.output
    # a finished run resumed: nothing left to do, finishes immediately with its report
    r = runner.invoke(app, ["train", "--resume", "last", "--out", str(out), "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output


def test_bf16_autocast_and_channels_last_train_on_the_cpu(tiny_data, tmp_path):
    """`--amp bf16 --channels-last`: the same loop under autocast; every term finite, all terms
    switched on, a report, and the prototype memory still float32 in the checkpoint."""
    out = tmp_path / "amp"
    result = fit(tiny_cfg(tiny_data, out, amp="bf16", channels_last=True))
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
    fit(tiny_cfg(tiny_data, out))
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
    fit(tiny_cfg(tiny_data, out, eval_every=2))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["eval"]["fine"]) for r in rows if "eval" in r] == sorted(forced.items())
    best, last = load_plain(out / "checkpoints" / "best.pt"), load_plain(out / "checkpoints" / "last.pt")
    assert best["iteration"] == 4 and last["iteration"] == 8
    assert last["best"] == {"metric": "fine_mIoU", "value": 30.0, "iteration": 4}
    assert json.loads((out / "report.json").read_text())["levels"]["fine"]["mIoU"] == 25.0
    # best.pt holds the weights of iteration 4, not those of the end
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


@pytest.mark.parametrize("dataset,crop,batch,iters", [
    ("cityscapes", (512, 1024), 8, 80_000), ("mapillary", (512, 1024), 8, 80_000),
    ("ade20k", (512, 512), 16, 60_000), ("pascal-part", (512, 512), 16, 60_000),
])
def test_dataset_recipes_are_the_papers(dataset, crop, batch, iters):
    """Paper Sec. 4.1: DeepLabV3+ R-101 at output stride 8, SGD lr 0.01, momentum 0.9, wd 1e-4, poly 0.9."""
    cfg = build_config({"data": {"dataset": dataset}})
    assert (cfg.data.crop, cfg.optim.batch_size, cfg.optim.iters) == (crop, batch, iters)
    assert (cfg.model.backbone, cfg.model.output_stride) == ("resnet101", 8)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.poly_power) == (0.01, 0.9, 1e-4, 0.9)
    assert cfg.loss.schedule == "sequential" and cfg.loss.terms == ["ce", "fh", "hh", "fl", "ll", "align"]
    assert cfg.resolved_out() == Path("runs") / f"{dataset}-resnet101"


def test_default_train_says_it_uses_the_built_in_set(tmp_path, monkeypatch):
    """`hiposeg train` with no dataset: says it trains the built-in synthetic set, generates it, trains."""
    import hiposeg.data.synthetic as synthetic

    real = synthetic.generate
    monkeypatch.setattr(synthetic, "generate", lambda root, **kw: real(root, train=4, val=2, size=64, seed=0, workers=1))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["train", "--iters", "2", "--batch-size", "2", "--crop", "64x64", "--workers", "0",
                            "--device", "cpu", "--set", "model.embed_dim=16"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "dataset synthetic (the built-in default: no dataset given)" in text
    assert "generating the built-in one" in text
    assert (tmp_path / "runs" / "synthetic-resnet18" / "report.json").exists()


# ------------------------------------------------------------------------------------------
# Bad input: each message says what is wrong and what to do, exit code 2, no traceback
# ------------------------------------------------------------------------------------------


def test_missing_prepared_data_names_the_prepare_command(tmp_path):
    """The recipe name decides the command, whatever the folder is called."""
    r = runner.invoke(app, ["train", "--dataset", "ade20k", "--data", str(tmp_path / "nope"), "--quiet"])
    assert r.exit_code == 2, r.output
    assert f"hiposeg prepare ade20k RAW --out {tmp_path / 'nope'}" in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "cityscapes"), "--quiet"])  # custom: by folder name
    assert r.exit_code == 2 and "hiposeg prepare cityscapes RAW" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize("setting,field", [
    ("loss.sigma1=2.0", "sigma1"),
    ("optim.lr=-1", "optim.lr"),
    ("loss.momentum=1.5", "loss.momentum"),
    ("loss.terms=ce,align", "align"),
    ("loss.terms=ce,xx", "xx"),
    ("model.backbone=vgg16", "model.backbone"),
    ("run.amp=fp8", "run.amp"),
    ("optim.itres=10", "optim.itres"),
])
def test_invalid_config_values_name_the_field(tiny_data, tmp_path, setting, field):
    r = runner.invoke(app, cli_args(tiny_data, tmp_path / "x", "--set", setting))
    assert r.exit_code == 2, r.output
    assert field in r.output and "Traceback" not in r.output


def test_batch_must_split_evenly_over_processes(tiny_data, tmp_path):
    r = runner.invoke(app, cli_args(tiny_data, tmp_path / "x", "--gpus", "2", "--batch-size", "3"))
    assert r.exit_code == 2 and "evenly" in r.output
    r = runner.invoke(app, cli_args(tiny_data, tmp_path / "y", "--batch-size", "1"))
    assert r.exit_code == 2 and "1 image per process" in r.output and "Traceback" not in r.output


def test_corrupt_and_foreign_checkpoints_are_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, cli_args(tiny_data, out)).exit_code == 0
    # another hierarchy: same images, one class renamed
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other, symlinks=True)
    h = json.loads((other / "hierarchy.json").read_text())
    h["levels"][0]["classes"][0]["name"] += "-renamed"
    (other / "hierarchy.json").write_text(json.dumps(h))
    from hiposeg.hierarchy import Hierarchy

    manifest = json.loads((other / "manifest.json").read_text())  # a consistent dataset of another hierarchy
    manifest["hierarchy"]["sha256"] = Hierarchy.from_file(other / "hierarchy.json").sha256
    (other / "manifest.json").write_text(json.dumps(manifest))
    ours, theirs = (Hierarchy.from_file(d / "hierarchy.json").sha256[:12] for d in (tiny_data, other))
    assert ours != theirs  # same name 'synthetic': only the digests tell them apart
    r = runner.invoke(app, ["eval", str(out), "--data", str(other), "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 2 and "hierarchy" in r.output, r.output
    assert ours in r.output and theirs in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train", "--resume", str(out / "checkpoints" / "last.pt"), "--data", str(other),
                            "--quiet", "--device", "cpu"])
    assert r.exit_code == 2 and "hierarchy" in r.output, r.output
    assert ours in r.output and theirs in r.output
    # truncated file
    bad = tmp_path / "bad.pt"
    data = (out / "checkpoints" / "last.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    r = runner.invoke(app, ["eval", str(bad), "--device", "cpu"])
    assert r.exit_code == 2 and "corrupt" in r.output and "Traceback" not in r.output


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


def test_checkpoint_loader_refuses_non_hiposeg_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"format": "something-else"}, p)
    with pytest.raises(Exception, match="not a hiposeg-checkpoint"):
        checkpoint.load(p)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(Exception, match="empty"):
        checkpoint.load(tmp_path / "empty.pt")
