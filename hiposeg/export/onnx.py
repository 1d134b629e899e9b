"""The `onnx` format (.onnx): an ONNX graph with dynamic batch, height and width.

The metadata record is JSON in the model's `metadata_props["hiposeg.json"]`. Needs the optional
`onnx` extra (onnx + onnxscript to write, onnxruntime to run). Every tensor is stored inline: a
model naming an external data file is refused, as that file would be read as weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hiposeg.atomic import atomic_write_bytes
from hiposeg.errors import UserError
from hiposeg.export.common import (METADATA_NAME, MIN_SIDE, BoundedInput, check_metadata, family_of_record,
                                   metadata_json, program_example)

NAME, SUFFIX = "onnx", ".onnx"
# ONNX Runtime has its own convolution kernels, whose summation order differs from torch's (relative
# to the logits' scale max(1, max |logit|)).
TOLERANCE = 1e-4
HINT = "Install the optional ONNX support: pip install 'hiposeg[onnx]' (onnx, onnxscript, onnxruntime)."
# The pure-numpy reference evaluator that checks an export where onnxruntime is missing is slow.
REFERENCE_CHECK_SHAPE = (1, 3, 65, 81)


def has_runtime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def require_export() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--format onnx needs the optional package(s) {', '.join(missing)}, which are not installed",
                        hint=HINT)


def write(segmenter: nn.Module, meta: dict[str, Any], out: Path) -> None:
    example, dynamic = program_example(family_of_record(meta))
    # The exporter narrates its passes on stdout and warns about internals; keep the CLI's output ours.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(segmenter.eval(), (example,), dynamo=True, dynamic_shapes=dynamic,
                                    input_names=["image"], output_names=["logits"])
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, json.dumps({**meta, "container": NAME})
    atomic_write_bytes(out, proto.SerializeToString())


def _require(package: str, path: Path) -> None:
    if importlib.util.find_spec(package) is None:
        raise UserError(f"running the ONNX model {path} needs the optional package {package}",
                        hint=HINT + " Or export the run in the hiposeg / torch-export format.")


def load(path: Path, device: torch.device) -> tuple[str, dict[str, Any], nn.Module]:
    """(NAME, metadata, an ONNX Runtime session as a module) of a model without external data."""
    _require("onnx", path)
    proto, meta = _read_proto(path)  # a damaged file is reported as such, with or without a runtime
    _require("onnxruntime", path)
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(f"--device cuda: this onnxruntime has no CUDA provider ({ort.get_available_providers()})",
                            hint="Install onnxruntime-gpu, or use --device cpu.")
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(proto.SerializeToString(), providers=providers)
    return NAME, meta, OnnxRuntimeModule(session, meta)


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata record of a hiposeg ONNX model, without starting a runtime."""
    _require("onnx", path)
    return _read_proto(path)[1]


class OnnxRuntimeModule(BoundedInput):
    """An ONNX Runtime session as a module: torch in, torch out (on the input's device)."""

    def __init__(self, session: Any, meta: dict[str, Any]) -> None:
        inp = meta.get("input", {})
        super().__init__(inp.get("min_side", MIN_SIDE), None, None, inp.get("multiple", 1))
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self._session_run, x)

    def _session_run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def _read_proto(path: Path) -> tuple[Any, dict[str, Any]]:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)  # never read files the model names
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have many types
        raise UserError(f"cannot read ONNX model {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        hint="The file is damaged: export it again with `hiposeg export --format onnx`.") from None
    _refuse_external_data(proto, path)
    props = {p.key: p.value for p in proto.metadata_props}
    return proto, check_metadata(metadata_json(props.get(METADATA_NAME, ""), path), path)


def _refuse_external_data(proto: Any, path: Path) -> None:
    """hiposeg writes every ONNX tensor inline. A tensor stored "externally" names a file to read: onnx
    reads it from beside the model, onnxruntime (given the model as bytes) from the working directory."""
    for name in _external_tensors(proto):
        raise UserError(f"refusing to load {path}: its tensor {name!r} is stored in an external file, which "
                        "hiposeg models never use (the file it names would be read as weights)",
                        hint="Export the model again with `hiposeg export --format onnx`; do not load files from "
                             "untrusted sources.")


def _external_tensors(proto: Any) -> Iterator[str]:
    from onnx import TensorProto

    for t in _all_tensors(proto):
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            yield t.name


def _all_tensors(proto: Any) -> Iterator[Any]:
    """Every TensorProto of a ModelProto: initializers, sparse initializers and node attributes of
    its graph, of every subgraph, and of its local functions."""
    graphs, nodes = [proto.graph], [n for f in proto.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for sparse in g.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            nodes.extend(g.node)
            continue
        for a in nodes.pop().attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sparse in [*([a.sparse_tensor] if a.HasField("sparse_tensor") else []), *a.sparse_tensors]:
                yield from (sparse.values, sparse.indices)
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)


def reference_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX's own pure-numpy reference evaluator: slow, but an independent implementation of the
    operators' semantics, so it checks the exported graph where onnxruntime is not installed."""
    from onnx.reference import ReferenceEvaluator

    proto, meta = _read_proto(path)
    evaluator = ReferenceEvaluator(proto)
    name = proto.graph.input[0].name
    inp = meta.get("input", {})
    bounds = BoundedInput(inp.get("min_side", MIN_SIDE), None, None, inp.get("multiple", 1))
    return lambda x: bounds.run(lambda t: torch.from_numpy(np.asarray(evaluator.run(None, {name: t.numpy()})[0])), x)
