"""Every model family trains, resumes, exports and predicts through the same engine as DeepLabV3+:
a tiny run per family (its smallest variant; FPN on EfficientNet-B0, U-Net on ResNet-18), exported
in every format with the projection head and prototype memory left out (the exported parameter
count is the bare family model's), reloaded and predicted from; an interrupted run resumes
bit-exactly; and one non-DeepLab family trains under DDP with 2 CPU processes."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import cv2
import pytest
import torch

from conftest import MODEL_SUFFIX, squash, tiny_config
from faults import StopAfter
from hiposeg.cli import app
from hiposeg.config import ModelConfig
from hiposeg.engine import fit
from hiposeg.errors import UserError
from hiposeg.export import TOLERANCE, load_inference_model
from hiposeg.export.common import count_parameters
from hiposeg.models import FAMILIES, build_segmenter

SMALL = {"hrnet": "hrnet_w18_small", "segformer": "mit_b0", "fpn": "efficientnet-b0", "unet": "resnet18"}
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
FORMATS = ["hiposeg", "torch-export"] + (["onnx"] if HAS_ONNX else [])


def family_config(data: Path, out: Path, family: str, **sections: dict):
    """The suite's tiny run (tiny_config) with `family` at its smallest variant, embeddings of 16."""
    model = {"name": family, "backbone": SMALL[family], "embed_dim": 16, **sections.pop("model", {})}
    return tiny_config(data, out, model=model, **sections)


@pytest.fixture(scope="module", params=list(SMALL))
def family_run(request, tiny_data, tmp_path_factory) -> tuple[str, Path]:
    """(family, run directory): 2 iterations with every term on from step 0, so the checkpoint holds a
    projection head and a filled prototype memory that export must leave out."""
    family = request.param
    out = tmp_path_factory.mktemp(family) / "run"
    fit(family_config(tiny_data, out, family, loss={"schedule": "joint"}, optim={"iters": 2}))
    return family, out


def program_operators(path: Path) -> set[str]:
    """The operators a .pt2 program calls (the "target" strings of its serialized graph)."""
    with zipfile.ZipFile(path) as z:
        program = json.loads(z.read(next(n for n in z.namelist() if n.endswith("models/model.json"))))
    nodes = program["graph_module"]["graph"]["nodes"]
    return {n["target"] for n in nodes}


def checkpoint_segmenter(family: str, run: Path) -> torch.nn.Module:
    m = build_segmenter(ModelConfig(name=family, backbone=SMALL[family]), 15)
    m.load_state_dict(torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"])
    return m.eval()


def test_every_family_exports_the_bare_segmenter_and_predicts_in_every_format(family_run, tiny_data, tmp_path, cli):
    family, run = family_run
    bare = count_parameters(build_segmenter(ModelConfig(name=family, backbone=SMALL[family]), 15))
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    head = sum(t.numel() for k, t in ckpt["projection"].items() if "running" not in k and "num_batches" not in k)
    assert head > 0 and ckpt["memory"]  # the training state held a head and a memory
    reference = checkpoint_segmenter(family, run)
    images = tiny_data / "val" / "images"
    predictions = {}
    for fmt in FORMATS:
        path = tmp_path / f"model{MODEL_SUFFIX[fmt]}"
        r = cli.invoke(app, ["export", str(run), "--out", str(path), "--format", fmt])
        assert r.exit_code == 0, r.output
        assert squash(f"parameters: {bare:,} exported = {bare:,} in a plain {FAMILIES[family].display} (1.00x); the "
                      f"training model had {bare + head:,} (+{head:,} projection head)") in squash(r.output)
        loaded = load_inference_model(path)
        assert loaded.metadata["arch"] == {"name": family, "backbone": SMALL[family], "num_classes": 15}
        if fmt == "torch-export":  # the family's own operator list covers its programs (the loader allows the union)
            assert program_operators(path) <= FAMILIES[family].program_ops
        for shape in [(1, 3, 64, 64), (2, 3, 70, 90)]:  # the second is no multiple of 32
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                want, got = reference(x), loaded.module(x)
            assert got.shape == want.shape == (shape[0], 15, *shape[2:])
            assert float((got - want).abs().max()) <= TOLERANCE[fmt] * max(1.0, float(want.abs().max())), (fmt, shape)
        r = cli.invoke(app, ["predict", str(path), str(images), "--out", str(tmp_path / fmt), "--device", "cpu",
                             "--workers", "0", "--overlay", "none", "-q"])
        assert r.exit_code == 0, r.output
        predictions[fmt] = {p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                            for p in sorted((tmp_path / fmt / "fine").iterdir())}
    names = [p.with_suffix(".png").name for p in sorted(images.iterdir())]
    for fmt in FORMATS:
        assert sorted(predictions[fmt]) == sorted(names)
        for name, labels in predictions[fmt].items():
            assert (labels == predictions["hiposeg"][name]).mean() > 0.999, (fmt, name)


def test_a_family_model_without_its_package_asks_for_the_models_extra(family_run, tmp_path, monkeypatch, cli):
    """eval and predict rebuild a hiposeg-format model with its family's library: without it, the hint."""
    family, run = family_run
    path = tmp_path / "model.pt"
    r = cli.invoke(app, ["export", str(run), "--out", str(path)])
    assert r.exit_code == 0, r.output
    monkeypatch.setitem(sys.modules, FAMILIES[family].requires[0][0], None)  # as if not installed
    with pytest.raises(UserError, match=f"the {family} models need the package") as e:
        load_inference_model(path)
    assert "pip install 'hiposeg[models]'" in e.value.hint


def test_every_family_resumes_an_interrupted_run_bit_exactly(family_run, tiny_data, tmp_path, monkeypatch):
    import hiposeg.engine as engine

    family, _ = family_run
    full = fit(family_config(tiny_data, tmp_path / "full", family, optim={"iters": 4}))
    monkeypatch.setattr(engine, "StopSignal", lambda: StopAfter(2))
    part = fit(family_config(tiny_data, tmp_path / "part", family, optim={"iters": 4}))
    assert part.interrupted and part.iterations == 2
    monkeypatch.undo()
    done = fit(family_config(tiny_data, tmp_path / "part", family, optim={"iters": 4}),
               resume=tmp_path / "part" / "checkpoints" / "last.pt")
    assert full.iterations == done.iterations == 4
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    for entry in ("model", "projection", "memory"):
        assert a[entry].keys() == b[entry].keys()
        for k in a[entry]:
            assert torch.equal(a[entry][k], b[entry][k]), f"{family}: {entry}.{k} differs after resume"


@pytest.mark.slow
def test_a_segformer_run_with_two_gloo_processes_keeps_the_ranks_identical(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    result = fit(family_config(tiny_data, out, "segformer", optim={"iters": 3, "batch_size": 4}, run={"gpus": 2}))
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["iteration"] == 3
    assert len(status["rank_digests"]) == 2 and status["rank_digests"][0] == status["rank_digests"][1]
    assert result.report is not None and result.report["images"] == 4
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert saved["config"]["model"]["name"] == "segformer" and saved["config"]["run"]["gpus"] == 2
