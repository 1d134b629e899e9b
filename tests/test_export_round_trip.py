"""`hiposeg export`: the segmenter alone is exported (the projection head, the auxiliary head and the
prototype memory are counted and left out), every format reproduces the trained segmenter's logits, and `eval` accepts
every format."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import squash
from hiposeg.cli import app
from hiposeg.config import ModelConfig
from hiposeg.errors import UserError
from hiposeg.export import TOLERANCE, load_inference_model
from hiposeg.export.onnx import reference_runner
from hiposeg.models import build_segmenter

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
FORMATS = ["hiposeg", "torch-export", pytest.param("onnx", marks=pytest.mark.skipif(
    not HAS_ONNX, reason="the optional onnx extra (onnx, onnxscript) is not installed"))]
# The tiny run: resnet18, output stride 16, 15 fine and 5 coarse classes, embed_dim 32, auxiliary head.
SEGMENTER_PARAMETERS = 12_332_895  # test_deeplabv3plus.py::test_parameter_count_equals_a_hand_count
HEAD_PARAMETERS = 256 * 256 + 2 * 256 + 256 * 32 + 32  # conv 256->256 (no bias), BN, conv 256->32
AUX_PARAMETERS = 256 * 256 * 9 + 2 * 256 + 256 * 15 + 15  # conv3x3 stage 3 (256) -> 256 (no bias), BN, conv -> 15
MEMORY_VALUES = (15 + 5) * 32 + 15 + 5  # a unit prototype and a "seen" flag per class of both levels


def load_plain(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def plain_segmenter():  # type: ignore[no-untyped-def]
    return build_segmenter(ModelConfig(backbone="resnet18", output_stride=16), 15)


def trained_segmenter(run: Path):  # type: ignore[no-untyped-def]
    """The reference, built here from the checkpoint's own segmenter weights."""
    m = plain_segmenter()
    m.load_state_dict(load_plain(run / "checkpoints" / "best.pt")["model"])
    return m.eval()


def tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


# ------------------------------------------------------------------------------------------
# What is exported
# ------------------------------------------------------------------------------------------


def test_export_strips_head_memory_and_training_state(tiny_run, exported_models):
    data, run = tiny_run
    ckpt = load_plain(run / "checkpoints" / "best.pt")
    assert ckpt["projection"] and ckpt["aux_head"] and ckpt["memory"] and ckpt["optimizer"]  # something to strip
    model = load_plain(exported_models["hiposeg"])  # plain data: weights_only loading works
    assert model["format"] == "hiposeg-model/1"
    assert not {"projection", "aux_head", "memory", "optimizer", "scaler", "rng", "config"} & set(model)
    plain = plain_segmenter()
    assert list(model["state_dict"]) == list(plain.state_dict())
    # every tensor in the file is a segmenter tensor: as many values as a plain DeepLabV3+ holds
    assert sum(t.numel() for t in tensors_in(model)) == sum(t.numel() for t in plain.state_dict().values())
    for k, v in model["state_dict"].items():
        assert torch.equal(v, ckpt["model"][k]), k
    n_params = sum(p.numel() for p in plain.parameters())
    assert n_params == SEGMENTER_PARAMETERS
    loaded = load_inference_model(exported_models["hiposeg"])
    assert sum(p.numel() for p in loaded.module.parameters()) == n_params
    program = torch.export.load(exported_models["torch-export"])
    assert sum(p.numel() for p in program.module().parameters()) == n_params
    assert not any("projection" in k or "mlp" in k or "aux" in k or "fcn" in k for k in program.state_dict)
    # what is needed to use it, against the prepared dataset's own hierarchy file
    h = json.loads((data / "hierarchy.json").read_text())
    fine = sorted(h["levels"][0]["classes"], key=lambda c: c["id"])
    coarse = sorted(h["levels"][1]["classes"], key=lambda c: c["id"])
    coarse_id = {c["name"]: c["id"] for c in coarse}
    assert model["classes"] == {"fine": [c["name"] for c in fine], "coarse": [c["name"] for c in coarse]}
    assert model["colors"]["fine"] == [list(c["color"]) for c in fine]
    assert model["fine_to_coarse"] == [coarse_id[c["parent"]] for c in fine]
    assert model["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert model["crop"] == [64, 64]
    assert model["arch"] == {"name": "deeplabv3plus", "backbone": "resnet18", "output_stride": 16,
                             "decoder_channels": 256, "head": "separable", "num_classes": 15}


def test_the_summary_counts_what_is_stripped_from_the_checkpoints_own_entries(tiny_run, tmp_path, cli):
    """The projection head, the auxiliary head and the prototype memory are counted from the checkpoint's
    entries (never rebuilt): the tiny run's, a checkpoint whose auxiliary head was left out (a run without
    `model.aux_head`; older checkpoints have no such entry), one whose entries were all emptied (a CE-only
    run has no projection head)."""
    _, run = tiny_run
    ckpt = load_plain(run / "checkpoints" / "best.pt")
    no_aux, emptied = tmp_path / "no-aux.pt", tmp_path / "no-branch.pt"
    torch.save({k: v for k, v in ckpt.items() if k != "aux_head"}, no_aux)
    torch.save({**ckpt, "projection": {}, "aux_head": {}, "memory": {}}, emptied)
    for source, heads, memory in [
        (run, {"projection head": HEAD_PARAMETERS, "auxiliary head": AUX_PARAMETERS}, MEMORY_VALUES),
        (no_aux, {"projection head": HEAD_PARAMETERS}, MEMORY_VALUES), (emptied, {"projection head": 0}, 0),
    ]:
        r = cli.invoke(app, ["export", str(source), "--out", str(tmp_path / "m.pt")])
        assert r.exit_code == 0, r.output
        left_out = ", ".join(f"+{n:,} {name}" for name, n in heads.items())
        assert squash(f"parameters: {SEGMENTER_PARAMETERS:,} exported = {SEGMENTER_PARAMETERS:,} in a plain DeepLabV3+ "
                      f"(1.00x); the training model had {SEGMENTER_PARAMETERS + sum(heads.values()):,} ({left_out}) "
                      f"and {memory:,} prototype memory values, none exported") in squash(r.output), r.output
        assert squash("logit difference 0 on a random 2x3x97x161 batch (tolerance 0; hiposeg)") in squash(r.output)


@pytest.mark.skipif(not HAS_ONNX, reason="the optional onnx extra (onnx, onnxscript) is not installed")
def test_onnx_export_holds_the_plain_segmenter_weights_only(exported_models):
    """The graph's float initializers are a plain DeepLabV3+'s weights. The exporter either folds each
    eval-mode BatchNorm into the conv before it (its weight, bias, mean and variance become one conv bias
    per channel) or keeps it (4 values per channel); the projection head and the prototype memory, both
    32 wide here (embed_dim), add nothing."""
    import onnx

    proto = onnx.load(str(exported_models["onnx"]))
    floats = {t.name: tuple(t.dims) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    plain = plain_segmenter()
    params = sum(p.numel() for p in plain.parameters())
    bn_channels = sum(m.num_features for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))
    values = sum(math.prod(dims) for dims in floats.values())
    assert values in (params - bn_channels, params + 2 * bn_channels), (values, params, bn_channels)
    for name, p in plain.named_parameters():
        if p.ndim == 4:  # every conv kernel, under its own name
            assert floats.get(name) == tuple(p.shape), name
    assert not any(w in name for name in floats for w in ("projection", "mlp", "proto", "memory"))
    assert not any(32 in dims for dims in floats.values())


# ------------------------------------------------------------------------------------------
# The same logits, in every format and in eval
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_to_the_trained_logits(tiny_run, exported_models, fmt):
    """Within the format's tolerance, relative to max(1, max |logit|) (here the logits are ~1); the
    tolerances themselves are tested in test_export_output.py."""
    _, run = tiny_run
    reference = trained_segmenter(run)
    if fmt == "onnx" and not HAS_ORT:
        run_model, shapes = reference_runner(exported_models[fmt]), [(1, 3, 64, 64)]  # slow pure-numpy evaluator
    else:
        loaded = load_inference_model(exported_models[fmt])
        assert loaded.source == fmt and loaded.crop == (64, 64) and loaded.hierarchy.name == "synthetic"
        run_model, shapes = loaded.module, [(1, 3, 64, 64), (3, 3, 45, 77)]  # two sizes, one odd
    g = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            want, got = reference(x), run_model(x)
        assert got.shape == want.shape == (shape[0], 15, *shape[2:])
        diff = float((got - want).abs().max())
        assert diff <= TOLERANCE[fmt] * max(1.0, float(want.abs().max())), (fmt, shape, diff)


@pytest.mark.parametrize("fmt", ["hiposeg", "torch-export", pytest.param("onnx", marks=pytest.mark.skipif(
    not (HAS_ONNX and HAS_ORT), reason="running ONNX models needs onnxruntime (the onnx extra)"))])
def test_eval_accepts_every_exported_format(tiny_run, exported_models, tmp_path, fmt, cli):
    data, run = tiny_run
    ref = tmp_path / "run.json"
    r = cli.invoke(app, ["eval", str(run), "--device", "cpu", "--workers", "0", "--mode", "whole", "--report", str(ref)])
    assert r.exit_code == 0, r.output
    rep = tmp_path / f"{fmt}.json"
    r = cli.invoke(app, ["eval", str(exported_models[fmt]), "--data", str(data), "--device", "cpu", "--workers", "0",
                         "--mode", "whole", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    a, b = json.loads(ref.read_text()), json.loads(rep.read_text())
    for level in ("fine", "coarse"):
        assert b["levels"][level]["mIoU"] == pytest.approx(a["levels"][level]["mIoU"], abs=1e-9)


@pytest.mark.slow
def test_torch_export_program_runs_without_hiposeg(exported_models, tmp_path):
    """The .pt2 program and its metadata load with plain PyTorch: no hiposeg module is imported."""
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "x.npy", x.numpy())
    code = f"""
import json, sys, numpy as np, torch
extra = {{"hiposeg.json": ""}}
program = torch.export.load({str(exported_models['torch-export'])!r}, extra_files=extra)
meta = json.loads(extra["hiposeg.json"])
with torch.no_grad():
    y = program.module()(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})))
np.save({str(tmp_path / 'y.npy')!r}, y.numpy())
assert not any(m.startswith("hiposeg") for m in sys.modules), "hiposeg was imported"
print(json.dumps({{"classes": len(meta["classes"]["fine"]), "mean": meta["normalization"]["mean"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"classes": 15, "mean": [0.485, 0.456, 0.406]}
    want = load_inference_model(exported_models["hiposeg"]).module(x).detach().numpy()
    assert np.abs(np.load(tmp_path / "y.npy") - want).max() <= 1e-5


def test_program_formats_refuse_inputs_outside_their_shape_range(exported_models):
    module = load_inference_model(exported_models["torch-export"]).module
    with pytest.raises(UserError, match="takes images of 32 to 8192 pixels per side; got 20x64") as e:
        module(torch.zeros(1, 3, 20, 64))
    assert "--mode slide" in e.value.hint
    with pytest.raises(UserError, match="at most 256 images per batch; got 257"):
        module(torch.zeros(257, 3, 32, 32))
