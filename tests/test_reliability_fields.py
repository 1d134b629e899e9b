"""Reliability: hiposeg files with the right format tag but missing or malformed fields.

A training checkpoint (`hiposeg-checkpoint/1`) or exported model (`hiposeg-model/1`, also the
metadata record inside .pt2 and .onnx programs) is edited the way a damaged or hand-edited file
would be: each field its readers use is deleted in turn, or given a value of the wrong type, or a
value of the right type that does not fit the model. Every command that reads such files (`train
--resume`, `eval`, `export`, `predict`) must answer with one clear message naming the file and the
field (exit 2), never a KeyError / TypeError traceback from inside hiposeg or torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import crafted
from conftest import fails_with
from faults import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# What `hiposeg train` writes and its readers use (the checkpoint module's docstring lists them);
# last_eval, hiposeg_version and torch_version are informative only.
CHECKPOINT_FIELDS = ["iteration", "config", "hierarchy", "hierarchy_sha256", "model", "projection", "memory",
                     "optimizer", "scaler", "rng", "best"]
MODEL_FIELDS = ["arch", "hierarchy", "normalization", "crop", "input", "state_dict"]


def commands(path: Path, data: Path, tmp: Path, *, resume: bool = True) -> dict[str, list[str]]:
    image = sorted((data / "val" / "images").iterdir())[0]
    every = {
        "train --resume": ["train", "--resume", path, "--data", data, "--out", tmp / "resumed", "--quiet",
                           "--device", "cpu"],
        "eval": ["eval", path, "--data", data, "--device", "cpu", "--workers", "0"],
        "export": ["export", path, "--out", tmp / "exported.pt"],
        "predict": ["predict", path, image, "--out", tmp / "pred", "--device", "cpu", "--workers", "0", "-q"],
    }
    return {k: [str(a) for a in v] for k, v in every.items() if resume or k != "train --resume"}


def edited(obj: dict[str, Any], loc: tuple, value: Any = None, *, delete: bool = False) -> dict[str, Any]:
    """A shallow-copied path down to `loc` (the original stays intact), with the last key set or deleted."""
    top = dict(obj)
    node = top
    for key in loc[:-1]:
        child = node[key]
        node[key] = child = dict(child) if isinstance(child, dict) else list(child)
        node = child
    if delete:
        del node[loc[-1]]
    else:
        node[loc[-1]] = value
    return top


@pytest.fixture(scope="module")
def ckpt(tiny_run) -> dict[str, Any]:
    _, run = tiny_run
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def model_payload(tiny_run, tmp_path_factory) -> dict[str, Any]:
    from hiposeg.export import export_model

    _, run = tiny_run
    out = tmp_path_factory.mktemp("fields") / "model.pt"
    export_model(run, out)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("field", CHECKPOINT_FIELDS)
def test_a_checkpoint_without_a_field_is_named_by_every_command(tiny_run, ckpt, tmp_path, field):
    data, _ = tiny_run
    path = tmp_path / f"no-{field}.pt"
    torch.save(edited(ckpt, (field,), delete=True), path)
    for args in commands(path, data, tmp_path).values():
        fails_with(args, f"{path} lacks the field '{field}'")


@pytest.mark.parametrize("loc, value, shown", [
    (("iteration",), "3", "'iteration'"),
    (("iteration",), -1, "'iteration'"),
    (("model", "classifier.weight"), [1, 2], "'model.classifier.weight'"),
    (("optimizer", "param_groups", 0, "lr"), "fast", "'optimizer.param_groups.0.lr'"),
    (("rng", "numpy", "pos"), "x", "'rng.numpy.pos'"),
    (("best", "value"), "high", "'best.value'"),
    (("scaler",), 1, "'scaler'"),
    (("config", "model", "backbone"), "vgg19", "'config'"),
    (("hierarchy", "levels"), 3, "'hierarchy'"),
], ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else None)
def test_a_checkpoint_with_a_malformed_field_is_named_by_every_command(tiny_run, ckpt, tmp_path, loc, value, shown):
    data, _ = tiny_run
    path = tmp_path / "malformed.pt"
    torch.save(edited(ckpt, loc, value), path)
    for args in commands(path, data, tmp_path).values():
        fails_with(args, f"{path} has a malformed field {shown}")


def wrong_shape(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(t.numel() + 1, dtype=t.dtype)


@pytest.mark.parametrize("field, edit", [
    ("model", lambda c: edited(c, ("model", "classifier.weight"), wrong_shape(c["model"]["classifier.weight"]))),
    ("memory", lambda c: edited(c, ("memory", next(iter(c["memory"]))), wrong_shape(next(iter(c["memory"].values()))))),
    ("optimizer", lambda c: edited(c, ("optimizer", "state", 0, "momentum_buffer"),
                                   wrong_shape(c["optimizer"]["state"][0]["momentum_buffer"]))),
    ("rng", lambda c: edited(c, ("rng", "torch"), c["rng"]["torch"][:10])),
])
def test_resuming_fields_that_do_not_fit_the_model_is_a_clear_error(tiny_run, ckpt, tmp_path, field, edit):
    """Well-typed values of the wrong size: the state-dict, optimizer and RNG restores are checked."""
    data, _ = tiny_run
    path = tmp_path / "misfit.pt"
    torch.save(edit(ckpt), path)
    fails_with(commands(path, data, tmp_path)["train --resume"], f"{path}: its field '{field}' does not fit")


def test_exporting_a_checkpoint_whose_weights_do_not_fit_is_a_clear_error(tiny_run, ckpt, tmp_path):
    """The segmenter weights export reads; the projection head and memory entries are only counted."""
    data, _ = tiny_run
    path = tmp_path / "misfit.pt"
    torch.save(edited(ckpt, ("model", "classifier.weight"), wrong_shape(ckpt["model"]["classifier.weight"])), path)
    fails_with(commands(path, data, tmp_path)["export"], f"{path}: its field 'model' does not fit")
    assert not (tmp_path / "exported.pt").exists()


@pytest.mark.parametrize("field", MODEL_FIELDS)
def test_an_exported_model_without_a_field_is_named_by_every_command(tiny_run, model_payload, tmp_path, field):
    data, _ = tiny_run
    path = tmp_path / f"no-{field}.pt"
    torch.save(edited(model_payload, (field,), delete=True), path)
    for args in commands(path, data, tmp_path, resume=False).values():
        fails_with(args, f"{path} lacks the field '{field}'")


@pytest.mark.parametrize("loc, value, shown", [
    (("arch", "backbone"), "vgg19", "'arch.backbone'"),
    (("arch", "num_classes"), 99, "'arch.num_classes'"),
    (("arch", "decoder_channels"), "wide", "'arch.decoder_channels'"),
    (("arch", "head"), 2, "'arch.head'"),
    (("normalization", "mean"), [0.5], "'normalization.mean'"),
    (("crop",), "64x64", "'crop'"),
    (("input", "min_side"), None, "'input.min_side'"),
], ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else None)
def test_an_exported_model_with_a_malformed_field_is_named_by_every_command(tiny_run, model_payload, tmp_path, loc,
                                                                           value, shown):
    data, _ = tiny_run
    path = tmp_path / "malformed.pt"
    torch.save(edited(model_payload, loc, value), path)
    for args in commands(path, data, tmp_path, resume=False).values():
        fails_with(args, f"{path} has a malformed field {shown}")


def test_program_metadata_without_a_field_is_named(tiny_run, model_payload, tmp_path):
    """The same record inside a torch.export program (hiposeg.json) and an ONNX model (metadata_props)."""
    data, _ = tiny_run
    meta = {k: v for k, v in model_payload.items() if k not in ("state_dict", "normalization")}
    program = crafted.conv_program(tmp_path / "m.pt2", meta)
    paths = [program]
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        onnx = None
    if onnx is not None:
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        proto = helper.make_model(graph)
        proto.metadata_props.add(key="hiposeg.json", value=json.dumps(meta))
        onnx.save(proto, str(tmp_path / "m.onnx"))
        paths.append(tmp_path / "m.onnx")
    for path in paths:
        for args in commands(path, data, tmp_path, resume=False).values():
            if args[0] != "export":  # export takes no programs (tests/test_reliability_programs.py)
                fails_with(args, f"{path} lacks the field 'normalization'")


@pytest.mark.parametrize("loc, value, shown", [
    (("crop",), [0, 0], "'crop': [0, 0], but the sliding windows of this model must be 16 to 8192 pixels per side"),
    (("crop",), [1, 1], "'crop': [1, 1], but the sliding windows of this model must be 16 to 8192 pixels per side"),
    (("crop",), [64, 1_000_000], "'crop': [64, 1000000], but the sliding windows of this model must be 16 to 8192"),
    (("normalization", "std"), [0.0, 0.0, 0.0], "'normalization.std.0': input should be greater than 0 (got 0.0)"),
    (("normalization", "std"), [0.2, float("nan"), 0.2], "'normalization.std.1': input should be a finite number"),
    (("normalization", "mean"), [0.5, 0.5, float("inf")], "'normalization.mean.2': input should be a finite number"),
], ids=["crop-0", "crop-1", "crop-huge", "std-0", "std-nan", "mean-inf"])
def test_model_metadata_values_inference_cannot_use_are_named_by_every_command(tiny_run, model_payload, tmp_path, loc,
                                                                              value, shown):
    """Well-typed metadata that inference cannot use: a crop of 0 (a failure deep inside torch), of 1
    (sliding windows of one pixel: hours for one photo) or beyond any input; a std of 0 or NaN (every
    input NaN, garbage labels, no warning). Each is named before any image is read."""
    data, _ = tiny_run
    path = tmp_path / "unusable.pt"
    torch.save(edited(model_payload, loc, value), path)
    for args in commands(path, data, tmp_path, resume=False).values():
        fails_with(args, f"{path} has a malformed field {shown}")
    assert not (tmp_path / "pred").exists() and not (tmp_path / "exported.pt").exists()


def test_a_programs_crop_must_be_an_input_it_takes(tiny_run, model_payload, tmp_path):
    """A program refuses inputs below its `input.min_side` (32), so its sliding windows must be at least
    that large: a crop of 16 (fine for the hiposeg format, which runs the module itself) is named."""
    data, _ = tiny_run
    meta = {k: v for k, v in model_payload.items() if k != "state_dict"}
    meta.update(container="torch-export", crop=[16, 16], input={**meta["input"], "max_side": 8192})
    path = crafted.conv_program(tmp_path / "m.pt2", meta)
    fails_with(commands(path, data, tmp_path, resume=False)["predict"],
               f"{path} has a malformed field 'crop': [16, 16], but the sliding windows of this model must be 32 to "
               "8192")
