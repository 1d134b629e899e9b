"""Model files that would run code or read files, or are damaged, are refused before anything runs.

Exported programs (torch.export .pt2, ONNX):

For each hostile file the test first proves it live: loaded with plain PyTorch (`torch.export.load`,
then `.module()` and one forward pass, in a throw-away process) it creates a marker file. Then every
hiposeg entry point that reads models refuses it with a message naming the file and the reason,
and the marker never appears:

* the constants config stored twice, torch reading the malicious first copy (an opaque object
  marked pickled) and Python's zipfile the benign last one; and the same with the two names
  differing only in case (torch looks names up case-insensitively);
* a symbolic shape that sympy.sympify evaluates as Python; guard code that `.module()` execs; a
  parameter name that breaks out of the string the code generator writes it into; an
  AOTInductor shared library that torch dlopens;
* each given as a .pt2 to `predict` and `eval`, renamed to a run directory's checkpoints/best.pt
  (the format is detected by content), and given to `export` and `train --resume`, which never
  load programs.

ONNX: a tensor stored "externally" names a file to read (next to the model for onnx, in the
working directory for onnxruntime); hiposeg models never use external data, so it is refused.

Damaged (truncated) exported models: each format's loader names the file and the damage.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import crafted
from conftest import MODEL_SUFFIX, fails_with
from crafted import Payload
from faults import one_thread  # noqa: F401
from hiposeg.errors import UserError
from hiposeg.export.torch_export import read_program_archive

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def build(attack: str, base: Path, out: Path, marker: Path) -> Path:
    if attack == "shadowed-config":
        return crafted.shadowed_config_program(base, out, marker)
    if attack == "case-shadowed-config":
        return crafted.shadowed_config_program(base, out, marker, case=True)
    if attack == "aoti":
        return crafted.aoti_program(base, out, marker, out.parent)
    return {"sympy": crafted.sympy_program, "guards": crafted.guards_program,
            "parameter-name": crafted.parameter_name_program}[attack](base, out, marker)


# the reason each refusal must give
REASON = {
    "shadowed-config": "stores the entry 'data/constants/model_constants_config.json' twice",
    "case-shadowed-config": "'DATA/constants/model_constants_config.json' and "
                            "'data/constants/model_constants_config.json' differ only in case",
    "sympy": "which sympy would evaluate as Python",
    "guards": "that is not integer arithmetic on the input's sizes, which torch would run as Python",
    "parameter-name": "is not a plain name (torch would write it into generated Python code) in "
                      "data/weights/model_weights_config.json",
    "aoti": "(AOTInductor native code)",
}
ATTACKS = [a if a != "aoti" else pytest.param(a, marks=pytest.mark.skipif(not HAS_CC, reason="no C compiler"))
           for a in REASON]


@pytest.fixture(scope="module")
def metadata(tiny_run) -> dict:
    """The hiposeg.json of a real torch-export model of the tiny run: with it, hiposeg without its
    checks would go on to build the program's module and run it, as for a genuine model."""
    from hiposeg.export.common import MAX_BATCH, MAX_SIDE, model_metadata

    _, run = tiny_run
    meta = model_metadata(torch.load(run / "checkpoints" / "best.pt", weights_only=True))
    return {**meta, "container": "torch-export",
            "input": {**meta["input"], "max_side": MAX_SIDE, "max_batch": MAX_BATCH}}


@pytest.fixture
def hostile(request, tmp_path, metadata) -> tuple[Path, Path]:
    """(the hostile .pt2 for the parametrized attack, its marker file)."""
    marker = tmp_path / "PAYLOAD-RAN"
    base = crafted.conv_program(tmp_path / "base.pt2", metadata)
    return build(request.param, base, tmp_path / "model.pt2", marker), marker


def run_with_plain_torch(path: Path) -> None:
    """torch.export.load + .module() + one forward pass, as any user of the file would, in a child. Its
    temporary folder is the test's own: torch extracts an AOTInductor library into an `aotinductor_*`
    folder there and never removes it."""
    code = ("import torch\n"
            f"try:\n    torch.export.load({str(path)!r}).module()(torch.zeros(1, 3, 8, 8))\n"
            "except Exception:\n    pass\n")
    scratch = path.parent / "child-tmp"
    scratch.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300, check=True,
                   env={**os.environ, "TMPDIR": str(scratch)})


@pytest.mark.parametrize("hostile", ATTACKS, indirect=True)
def test_hostile_programs_are_live(hostile):
    """Control: loaded and run with plain PyTorch, each file runs its payload."""
    path, marker = hostile
    run_with_plain_torch(path)
    assert marker.exists()


def test_the_shadowed_copies_are_read_differently_by_python_and_torch(tmp_path):
    """The premise of the duplicate-entry attack, on torch's own reader: it returns the malicious
    copy that Python's zipfile never shows."""
    base = crafted.conv_program(tmp_path / "base.pt2")
    for case in (False, True):
        path = crafted.shadowed_config_program(base, tmp_path / f"m{case}.pt2", tmp_path / "marker", case=case)
        assert b"use_pickle" in crafted.torch_reads(path, crafted.CONSTANTS_CONFIG)
        assert crafted.python_reads(path, crafted.CONSTANTS_CONFIG) == b'{"config": {}}'


def refused(args: list, marker: Path, *needles: str) -> None:
    try:
        fails_with(args, *needles)
    finally:
        assert not marker.exists(), f"the payload RAN during `hiposeg {args[0]}`"


@pytest.mark.parametrize("hostile", ATTACKS, indirect=True)
def test_predict_refuses_a_hostile_program(tiny_run, hostile, tmp_path, request):
    data, _ = tiny_run
    path, marker = hostile
    image = sorted((data / "val" / "images").iterdir())[0]
    reason = REASON[request.node.callspec.params["hostile"]]
    refused(["predict", path, image, "--out", tmp_path / "pred", "--device", "cpu", "--workers", "0", "-q"],
            marker, f"refusing to load {path}", reason)
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("hostile", ATTACKS, indirect=True)
@pytest.mark.parametrize("as_run_directory", [False, True], ids=["file", "run-best.pt"])
def test_eval_refuses_a_hostile_program(tiny_run, hostile, tmp_path, request, as_run_directory):
    """Also when the program sits at a run directory's checkpoints/best.pt (detected by content)."""
    data, _ = tiny_run
    path, marker = hostile
    if as_run_directory:
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        path = path.rename(tmp_path / "run" / "checkpoints" / "best.pt")
    target = path.parent.parent if as_run_directory else path
    reason = REASON[request.node.callspec.params["hostile"]]
    refused(["eval", target, "--data", data, "--device", "cpu", "--workers", "0"], marker,
            f"refusing to load {path}", reason)


@pytest.mark.parametrize("hostile", ["shadowed-config", "case-shadowed-config"], indirect=True)
def test_export_and_resume_refuse_programs_unread(tiny_run, hostile, tmp_path):
    """export and --resume take training checkpoints and hiposeg-format models only: a program, also
    one renamed to a run's checkpoints/best.pt or last.pt, is named as such and never read."""
    data, _ = tiny_run
    path, marker = hostile
    refused(["export", path, "--out", tmp_path / "m.pt"], marker, f"{path} is a torch-export program")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    best = shutil.copy(path, run / "checkpoints" / "best.pt")
    refused(["export", run, "--out", tmp_path / "m.pt"], marker, f"{best} is a torch-export program")
    assert not (tmp_path / "m.pt").exists()
    last = path.rename(run / "checkpoints" / "last.pt")
    refused(["train", "--resume", "last", "--out", run, "--data", data, "--quiet", "--device", "cpu"], marker,
            f"{last} is a torch-export program")


def test_a_genuine_program_passes_the_same_checks(tmp_path):
    """The checks refuse the attacks, not torch.export archives: the untouched base program is read."""
    base = crafted.conv_program(tmp_path / "base.pt2")
    assert read_program_archive(base) == base.read_bytes()


def test_guard_code_of_integer_arithmetic_on_the_input_sizes_is_read(tmp_path):
    """The guards torch.export writes for the HRNet and SegFormer programs (sides that are multiples of
    32; stage sizes that line up or are not 1) and range constraints of a multiple of a symbol."""
    guards = ["(((-1)*L['x'].size()[2]) % 32) == 0",
              "(1 + (((-1) + L['x'].size()[3]) // 4)) == (2 + 2*(((-1) + L['x'].size()[3]) // 8))",
              "torch.sym_max(1, 1 + (((-7) + (((-1) + L['x'].size()[3]) // 4)) // 8)) > 1",
              "(L['x'].size()[0] % (L['x'].size()[0]*(1 + (((-1) + L['x'].size()[3]) // 4)))) != 0",
              "L['x'].size()[2] ** 2 >= 4096"]

    def plain(p: dict) -> None:
        p["guards_code"] = guards
        p["range_constraints"]["32*s9"] = {"min_val": 64, "max_val": 8192}

    path = crafted.edited_program(crafted.conv_program(tmp_path / "base.pt2"), tmp_path / "m.pt2", plain)
    assert read_program_archive(path) == path.read_bytes()


@pytest.mark.parametrize("mutate, reason", [
    *[(lambda p, g=guard: p.__setitem__("guards_code", ["L['x'].size()[2] >= 64", g]), "carries guard code")
      for guard in ["True", "L['x'].size()[2] ** 99999 > 1", "__import__('os').system('x') is None",
                    "L['x'].size()[2] > 1 # ", "L['x'].size()[2] > 1, \"", "L['x'].shape[2] > 1",
                    "L['x;'].size()[2] > 1", "torch.ops.aten.from_file(1) > 1"]],
    (lambda p: p["range_constraints"].__setitem__("__import__('os')", {"min_val": 1, "max_val": 2}),
     "its range constraint \"__import__('os')\" is not a shape symbol"),
    (lambda p: p["graph_module"]["graph"]["nodes"][0].__setitem__("target", "torch.os.system"),
     "it calls 'torch.os.system', not an operator of a hiposeg program"),
    (lambda p: p["graph_module"]["graph"]["nodes"][0].__setitem__("target", "torch.ops.aten.from_file.default"),
     "it calls 'torch.ops.aten.from_file.default'"),
    (lambda p: p["graph_module"]["signature"]["input_specs"][2]["user_input"]["arg"]
     ["as_tensor"].__setitem__("name", "x\ny"), "its name 'x\\ny' is not a plain name"),
    (lambda p: p["graph_module"]["module_call_graph"][0]["signature"].__setitem__(
        "in_spec", '[1, {"type": "collections.namedtuple", "context": "null", "children_spec": []}]'),
     "its in_spec names types other than tuples, lists and dicts"),
    (lambda p: p["graph_module"]["graph"]["nodes"][0]["metadata"].__setitem__("stack_trace", "x\ry"),
     "its stack_trace holds control characters"),
    *[(lambda p, e=expr: p["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0].__setitem__(
        "as_expr", {"expr_str": e, "hint": {"as_int": 2}}), "which sympy would evaluate as Python")
      for expr in ["Symbol('s0', positive=True).func", "Symbol('__import__')", "Function('f')(Symbol('s0'))",
                   "Integer(10**9)", "Add(Symbol('s0'), Integer(True))", "s0"]],
], ids=["guards-bool", "guards-power", "guards-call", "guards-comment", "guards-quote", "guards-attribute",
        "guards-input-name", "guards-op", "range-key", "callable-target", "file-reading-op", "name", "treespec-type",
        "carriage-return",
        "sym-attribute", "sym-dunder-symbol", "sym-unknown-function", "sym-arithmetic", "sym-bool-integer", "sym-bare-name"])
def test_program_strings_torch_would_resolve_or_generate_code_from_must_be_plain(tmp_path, mutate, reason):
    """Beyond the live payloads: every string of the serialized program that torch resolves to a
    callable, evaluates, or writes into generated code is held to the plain form hiposeg writes."""
    base = crafted.conv_program(tmp_path / "base.pt2")
    path = crafted.edited_program(base, tmp_path / "m.pt2", mutate)
    with pytest.raises(UserError, match="refusing to load") as e:
        read_program_archive(path)
    assert reason in e.value.message


@pytest.mark.parametrize("entries, reason", [
    (lambda es, r: [*es, (f"{r}/data/constants/opaque_obj_0", b"x")], "'data/constants/opaque_obj_0', which hiposeg"),
    (lambda es, r: [*es, (f"{r}/data/weights/model.pt", b"x")], "'data/weights/model.pt', which hiposeg"),
    (lambda es, r: [*es, (f"{r}/data/weights/../x", b"x")], "'data/weights/../x', which hiposeg"),
    (lambda es, r: [*es, (f"{r}/data\\weights\\weight_9", b"x")], "which hiposeg programs never contain"),
    (lambda es, r: [*es, (f"{r}/extra/", b"")], "'extra/', which hiposeg"),
    (lambda es, r: [*es, ("other/data/weights/weight_0", b"x")], "is not a valid torch.export archive"),
    (lambda es, r: [(n, d) for n, d in es if not n.endswith(crafted.CONSTANTS_CONFIG)], "missing"),
], ids=["opaque-object", "legacy-pickle", "dot-dot", "backslash", "directory", "second-root", "missing-config"])
def test_archive_entries_must_be_those_of_a_hiposeg_program(tmp_path, entries, reason):
    base = crafted.conv_program(tmp_path / "base.pt2")
    es = crafted.entries_of(base)
    path = crafted.write_entries(tmp_path / "m.pt2", entries(es, crafted.root_of(es)))
    with pytest.raises(UserError) as e:
        read_program_archive(path)
    assert reason in e.value.message and str(path) in e.value.message


# ------------------------------------------------------------------------------------------
# Pickled objects inside a torch.export archive
# ------------------------------------------------------------------------------------------


def crafted_program(path: Path, marker: Path) -> Path:
    """A torch.export archive (.pt2) whose pickled sample inputs carry the payload."""
    program = torch.export.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 8, 8),))
    clean = path.with_name("clean.pt2")
    torch.export.save(program, clean, extra_files={"hiposeg.json": "{}"})
    buf = io.BytesIO()
    torch.save({"x": Payload(marker)}, buf)
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = buf.getvalue() if info.filename.endswith("sample_inputs/model.pt") else src.read(info)
            dst.writestr(info, data)
    return path


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_commands_refuse_code_in_a_torch_export_archive(tiny_run, tmp_path, command):
    data, _ = tiny_run
    marker = tmp_path / "PAYLOAD-RAN"
    model = crafted_program(tmp_path / "model.pt2", marker)
    if command == "eval":
        args = ["eval", model, "--data", data, "--device", "cpu", "--workers", "0"]
    else:
        image = sorted((data / "val" / "images").iterdir())[0]
        args = ["predict", model, image, "--out", tmp_path / "pred", "--device", "cpu", "--workers", "0", "-q"]
    refused(args, marker, "refusing to load", str(model))


def pickled_weight_program(path: Path, marker: Path) -> Path:
    """A .pt2 whose weight entry says use_pickle and whose bytes are a code-running pickle (each
    record stored once, so torch and Python read the same bytes)."""
    program = torch.export.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 8, 8),))
    clean = path.with_name("clean-w.pt2")
    torch.export.save(program, clean, extra_files={"hiposeg.json": "{}"})
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    with zipfile.ZipFile(clean) as src:
        config_name = next(n for n in src.namelist() if n.endswith("weights/model_weights_config.json"))
        cfg = json.loads(src.read(config_name))
        first = next(iter(cfg["config"].values()))
        first["use_pickle"] = True
        target = config_name.replace("model_weights_config.json", first["path_name"])
        with zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                data = {config_name: json.dumps(cfg).encode(), target: buf.getvalue()}.get(info.filename)
                dst.writestr(info, src.read(info) if data is None else data)
    return path


def test_pickled_weights_in_a_torch_export_archive_are_refused_before_loading(tmp_path):
    from hiposeg.export import load_inference_model

    marker = tmp_path / "PAYLOAD-RAN"
    model = pickled_weight_program(tmp_path / "w.pt2", marker)
    with pytest.raises(UserError, match="is not a plain tensor: torch would unpickle it"):
        load_inference_model(model)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# ONNX
# ------------------------------------------------------------------------------------------

needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
                                reason="the optional onnx extra is not installed")


@needs_onnx
def test_onnx_external_data_is_live(tmp_path, monkeypatch):
    """Control: onnxruntime, given the model as bytes, reads the named file from the working directory."""
    import onnx
    import onnxruntime as ort

    (tmp_path / "secret.bin").write_bytes(b"SECRET-CONTENTS!")
    model = crafted.onnx_with_external_weights(tmp_path / "m.onnx", "secret.bin", 16)
    monkeypatch.chdir(tmp_path)
    proto = onnx.load(str(model), load_external_data=False)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {})[0].tobytes() == b"SECRET-CONTENTS!"


@needs_onnx
def test_onnx_with_external_data_is_refused(tiny_run, tmp_path, monkeypatch):
    data, _ = tiny_run
    (tmp_path / "secret.bin").write_bytes(b"SECRET-CONTENTS!")
    model = crafted.onnx_with_external_weights(tmp_path / "m.onnx", "secret.bin", 16)
    monkeypatch.chdir(tmp_path)
    image = sorted((data / "val" / "images").iterdir())[0]
    for args in (["predict", model, image, "--out", tmp_path / "pred", "--device", "cpu", "--workers", "0", "-q"],
                 ["eval", model, "--data", data, "--device", "cpu", "--workers", "0"]):
        fails_with(args, f"refusing to load {model}: its tensor 'W' is stored in an external file")


# ------------------------------------------------------------------------------------------
# Damaged exported models
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,words", [
    ("hiposeg", "is corrupt or truncated"), ("torch-export", "is not a valid torch.export archive"),
    pytest.param("onnx", "cannot read ONNX model", marks=pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript")),
        reason="the optional onnx extra is not installed"))])
def test_truncated_exported_models_are_refused_clearly(exported_models, tmp_path, monkeypatch, fmt, words):
    """Each format's own damaged-file message; for ONNX with onnxruntime hidden, as telling a damaged file
    needs only onnx (the file is read before the runtime is looked for)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    data = exported_models[fmt].read_bytes()
    bad = tmp_path / f"bad{MODEL_SUFFIX[fmt]}"
    bad.write_bytes(data[: len(data) // 2])
    output = fails_with(["predict", bad, tmp_path, "--out", tmp_path / "p", "--device", "cpu"], bad.name, words)
    assert "onnxruntime" not in output


# ------------------------------------------------------------------------------------------
# Archives that cost more memory than the file holds (deflated entries, entries that overlap)
# ------------------------------------------------------------------------------------------

ZEROS = 1 << 20  # float32 zeros per tensor: 4 MiB once loaded


def inflating(attack: str, tmp_path: Path) -> Path:
    """A small file that torch.load turns into 32 MiB of tensors: 8 zero tensors, their entries deflated
    (`torch.save` never compresses) or all read from one stored copy (overlapping zip entries)."""
    plain = tmp_path / "plain.pt"
    torch.save({"format": "hiposeg-model/1", "t": [torch.zeros(ZEROS) for _ in range(8)]}, plain)
    if attack == "deflated":
        return crafted.deflated(plain, tmp_path / "deflated.pt")
    root = crafted.root_of(crafted.entries_of(plain))
    return crafted.aliased(plain, tmp_path / "aliased.pt", {f"{root}/data/{i}": f"{root}/data/0" for i in range(1, 8)})


@pytest.mark.parametrize("attack", ["deflated", "aliased"])
def test_inflating_archives_are_live(tmp_path, attack):
    """torch.load (weights-only) reads several times the file's size into memory from either file."""
    path = inflating(attack, tmp_path)
    loaded = torch.load(path, weights_only=True)["t"]
    assert sum(t.nbytes for t in loaded) == 8 * 4 * ZEROS > 3 * path.stat().st_size


@pytest.mark.parametrize("attack, reason", [("deflated", "is compressed, which torch would inflate in memory"),
                                            ("aliased", "more than the file's")])
def test_model_and_checkpoint_archives_that_inflate_beyond_their_file_are_refused_before_loading(
        tiny_run, tmp_path, monkeypatch, attack, reason):
    """Every command that reads a `.pt` (model, checkpoint, run directory) judges its archive with zipfile
    and torch's own reader before torch.load: entries stored and adding up to no more than the file."""
    data, _ = tiny_run
    path = inflating(attack, tmp_path)
    loads: list = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    image = sorted((data / "val" / "images").iterdir())[0]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = Path(shutil.copy(path, run / "checkpoints" / "last.pt"))
    for args, file in [(["predict", path, image, "--out", tmp_path / "p", "--device", "cpu", "--workers", "0"], path),
                       (["eval", path, "--data", data, "--device", "cpu", "--workers", "0"], path),
                       (["export", path, "--out", tmp_path / "m.pt"], path),
                       (["train", "--resume", "last", "--out", run, "--data", data, "--quiet"], last)]:
        fails_with(args, f"refusing to load {file}", reason)
    assert loads == [] and not (tmp_path / "p").exists() and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("where", ["archive", "sample inputs"])
def test_a_program_with_compressed_entries_is_refused(exported_models, tmp_path, where):
    """The same rule for `.pt2` archives, and for the torch.save archive a program carries inside
    (its sample inputs), which torch.export.load reads with torch.load."""
    program = exported_models["torch-export"]
    if where == "archive":
        path = crafted.deflated(program, tmp_path / "deflated.pt2")
    else:
        inner = tmp_path / "inputs.pt"
        root = crafted.root_of(crafted.entries_of(program))
        inner.write_bytes(crafted.python_reads(program, "data/sample_inputs/model.pt"))
        packed = crafted.deflated(inner, tmp_path / "inputs-deflated.pt").read_bytes()
        path = crafted.write_entries(tmp_path / "inner.pt2", [
            (name, packed if name == f"{root}/data/sample_inputs/model.pt" else body)
            for name, body in crafted.entries_of(program)])
    within = "in its record data/sample_inputs/model.pt, " if where == "sample inputs" else ""
    with pytest.raises(UserError, match=f"refusing to load .*: {within}its entry '.+' is compressed"):
        read_program_archive(path)
