"""The `torch-export` format (.pt2): a `torch.export` program with dynamic batch, height and width.

Runs with plain PyTorch, no hiposeg code; the metadata record is the archive's extra file
`hiposeg.json`. Loading is guarded: `torch.export.load` is not a data loader (see the comment above
`read_program_archive`), so an archive is read only once proven to hold nothing but what
`hiposeg export` writes, and its operators only those of the registered model families
(`hiposeg.models.PROGRAM_OPS`, each family's list in its own module).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hiposeg.archive import Archive, check_archive, reading
from hiposeg.atomic import atomic_write_bytes
from hiposeg.errors import UserError
from hiposeg.export.common import (MAX_BATCH, MAX_SIDE, METADATA_NAME, MIN_SIDE, BoundedInput, check_metadata,
                                   family_of_record, metadata_json, program_example)
from hiposeg.export.program_strings import RANGE_KEY, plain_guard, unplain_string
from hiposeg.safeload import load_json

NAME, SUFFIX = "torch-export", ".pt2"
# torch.export runs the same aten kernels as the reference after decomposition; relative to the
# logits' scale max(1, max |logit|), as float32 rounding grows with the values summed.
TOLERANCE = 1e-5


def write(segmenter: nn.Module, meta: dict[str, Any], out: Path) -> None:
    example, dynamic = program_example(family_of_record(meta))
    program = torch.export.export(segmenter.eval(), (example,), dynamic_shapes=dynamic)
    meta = {**meta, "container": NAME, "input": {**meta["input"], "max_side": MAX_SIDE, "max_batch": MAX_BATCH}}
    # Serialised in memory, then written: torch.export.save's zip writer, handed a file whose write
    # fails (a full disk), leaves a writer whose destructor aborts the interpreter at exit.
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_NAME: json.dumps(meta)})
    atomic_write_bytes(out, buffer.getvalue())


def load(path: Path, device: torch.device) -> tuple[str, dict[str, Any], nn.Module]:
    """(NAME, metadata, the program as a module on `device`), once the archive is proven plain."""
    extra = {METADATA_NAME: ""}
    data = read_program_archive(path)
    try:
        with _weights_only_loads():  # a second line of defence behind read_program_archive
            program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except pickle.UnpicklingError:
        raise program_refusal(path, "it contains pickled Python objects that only unsafe unpickling could "
                                    "restore") from None
    except Exception as e:  # noqa: BLE001 - any failure of the archive reader means the same to the user
        raise UserError(f"cannot load torch.export program {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        hint="The file is damaged or from an incompatible PyTorch version: export it again "
                             "(the hiposeg format is the portable one).") from None
    meta = check_metadata(metadata_json(extra[METADATA_NAME], path), path)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return NAME, meta, ExportedProgramModule(program.module(), meta)


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata record of a hiposeg program, read from the proven archive without loading the program."""
    data = read_program_archive(path)
    record = reading(lambda: _proven_archive(data, path).reader.get_record(f"extra/{METADATA_NAME}"), _invalid(path))
    return check_metadata(metadata_json(record, path), path)


class ExportedProgramModule(BoundedInput):
    """A torch.export program as a module. The program's own module refuses .train()/.eval() (it is
    frozen in eval mode), so it is kept outside the module tree."""

    def __init__(self, program: Callable[[torch.Tensor], torch.Tensor], meta: dict[str, Any]) -> None:
        inp = meta.get("input", {})
        super().__init__(inp.get("min_side", MIN_SIDE), inp.get("max_side", MAX_SIDE), inp.get("max_batch", MAX_BATCH),
                         inp.get("multiple", 1))
        self._program = [program]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self._program[0], x)


# ------------------------------------------------------------------------------------------
# Proving a torch.export archive plain before torch reads it
# ------------------------------------------------------------------------------------------
# `torch.export.load` is not a data loader. Depending on what the archive says, it unpickles
# (weights/constants marked `use_pickle`, opaque and custom objects, legacy `.pt` payloads, sample
# inputs), dlopens AOTInductor shared libraries (data/aotinductor/), `sympy.sympify`s (= evals)
# every symbolic-shape expression, execs the program's `guards_code`, and writes parameter names
# unescaped into the Python source it generates for `.module()`. So a `.pt2` is loaded only when
# every record torch will read is one `hiposeg export` writes, and every string torch turns into
# code is of the plain form hiposeg's exporter produces. The records are read with torch's own
# reader (`torch._C.PyTorchFileReader`) from the same bytes then handed to torch, so what is judged
# is what torch loads: torch matches entry names case-insensitively and, for a name stored twice,
# reads whichever copy its binary search meets, where Python's `zipfile` reads the last one. Those
# archive-level checks (and: every entry stored, never inflated) are `hiposeg.archive`'s, shared with
# the `.pt` loader; the records and strings are judged here.

# The records of a hiposeg program, below the archive's root folder (model name: "model").
PROGRAM_JSON, SAMPLE_INPUTS = "models/model.json", "data/sample_inputs/model.pt"
# weight / constant table -> the file-name prefix of its raw tensor records
PAYLOAD_CONFIGS = {"data/weights/model_weights_config.json": "weight_",
                   "data/constants/model_constants_config.json": "tensor_"}
PROGRAM_RECORD = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                            r"|models/model\.json|data/sample_inputs/model\.pt|extra/hiposeg\.json"
                            r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
                            r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+")
REQUIRED_RECORDS = ("archive_format", "archive_version", ".data/version", PROGRAM_JSON, SAMPLE_INPUTS,
                    f"extra/{METADATA_NAME}", *PAYLOAD_CONFIGS)
# Which strings of the program are plain: export/program_strings.py (operators: models.PROGRAM_OPS).


def program_refusal(path: Path, why: str) -> UserError:
    return UserError(f"refusing to load {path}: {why}",
                     hint="hiposeg programs hold plain tensors and a plain graph only. Do not load files from "
                          "untrusted sources; export the model again with `hiposeg export --format torch-export`.")


def read_program_archive(path: Path) -> bytes:
    """The bytes of `path` once proven to hold nothing torch.export.load would run, or a UserError.
    The caller hands these very bytes to torch (no second read of the file)."""
    data = path.read_bytes()
    archive = _proven_archive(data, path)

    def record(name: str) -> bytes:
        return reading(lambda: archive.reader.get_record(name), _invalid(path))

    records = _checked_record_names(archive.records, path)
    for config, prefix in PAYLOAD_CONFIGS.items():
        _check_payload_config(_program_json(record(config), config, path), config, prefix, records, path)
    _check_sample_inputs(record(SAMPLE_INPUTS), path)
    _check_program(_program_json(record(PROGRAM_JSON), PROGRAM_JSON, path), path)
    return data


def _proven_archive(data: bytes, path: Path, within: str = "") -> Archive:
    """`data` (the file, or its record `within`) as an archive Python and torch read alike, every entry
    stored (`hiposeg.archive`)."""
    where = f"in its record {within}, " if within else ""
    return check_archive(data, len(data), lambda why: program_refusal(path, where + why), _invalid(path))


def _invalid(path: Path) -> Callable[[Exception], UserError]:
    return lambda e: _invalid_archive(path, e)


def _invalid_archive(path: Path, e: Exception) -> UserError:
    return UserError(f"{path} is not a valid torch.export archive ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                     hint="Export the model again with `hiposeg export --format torch-export`.")


def _checked_record_names(records: list[str], path: Path) -> set[str]:
    """Refuse any archive that holds a record hiposeg never writes (AOTInductor libraries, pickled
    objects, legacy payloads, ...) or lacks one it always writes; the names themselves were proven
    unambiguous (`hiposeg.archive.check_archive`)."""
    for name in records:
        if not PROGRAM_RECORD.fullmatch(name):
            what = " (AOTInductor native code)" if name.lower().startswith("data/aotinductor/") else ""
            raise program_refusal(path, f"it holds the entry {name[:80]!r}{what}, which hiposeg programs never contain")
    missing = [r for r in REQUIRED_RECORDS if r not in records]
    if missing:
        raise _invalid_archive(path, ValueError(f"missing {', '.join(missing)}"))
    return set(records)


def _program_json(data: bytes, record: str, path: Path) -> Any:
    return load_json(data, f"{path} (record {record})",
                     hint="Export the model again with `hiposeg export --format torch-export`.")


def _check_payload_config(config: Any, record: str, prefix: str, records: set[str], path: Path) -> None:
    """Every weight / constant is a raw tensor record (no pickle, no opaque or custom object)."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise program_refusal(path, f"its {record} is not a table of tensors")
    folder = record.rsplit("/", 1)[0]
    for fqn, entry in entries.items():
        file = entry.get("path_name") if isinstance(entry, dict) else None
        plain = (isinstance(file, str) and re.fullmatch(re.escape(prefix) + r"\d+", file) is not None
                 and f"{folder}/{file}" in records and entry.get("use_pickle") is False
                 and isinstance(entry.get("tensor_meta"), dict))
        if not plain:
            raise program_refusal(path, f"its entry {fqn[:80]!r} in {record} is not a plain tensor: torch would "
                                        "unpickle it as an arbitrary Python object")
    _check_strings(config, record, path)


def _check_sample_inputs(data: bytes, path: Path) -> None:
    """The traced example: one image batch (an archive of its own, stored like the outer one),
    loadable without unpickling any Python object."""
    _proven_archive(data, path, within=SAMPLE_INPUTS)
    try:
        inputs = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise program_refusal(path, f"its sample inputs ({SAMPLE_INPUTS}) contain pickled Python objects that only "
                                    "unsafe unpickling could restore") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise _invalid_archive(path, e) from None
    args, kwargs = inputs if isinstance(inputs, tuple) and len(inputs) == 2 else (None, None)
    if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], torch.Tensor) and kwargs == {}):
        raise program_refusal(path, f"its sample inputs ({SAMPLE_INPUTS}) are not one image batch")


def _check_program(program: Any, path: Path) -> None:
    """The serialized program (models/model.json): guard code of integer arithmetic on the input's
    sizes only, only hiposeg's operators, and every string torch resolves, evaluates or writes into
    code of the plain form."""
    if not isinstance(program, dict):
        raise program_refusal(path, f"its {PROGRAM_JSON} is not a serialized program")
    guards = program.get("guards_code") or []
    for guard in guards if isinstance(guards, list) else [guards]:
        if not (isinstance(guard, str) and plain_guard(guard)):
            raise program_refusal(path, f"it carries guard code {str(guard)[:80]!r} that is not integer arithmetic on "
                                        "the input's sizes, which torch would run as Python")
    ranges = program.get("range_constraints")
    for key in ranges if isinstance(ranges, dict) else []:  # looked up by name, never parsed
        if not RANGE_KEY.fullmatch(key):
            raise program_refusal(path, f"its range constraint {key[:80]!r} is not a shape symbol")
    _check_strings({k: v for k, v in program.items() if k not in ("guards_code", "range_constraints")}, PROGRAM_JSON,
                   path)
    _check_strings(list(ranges.values()) if isinstance(ranges, dict) else ranges, PROGRAM_JSON, path)


def _check_strings(data: Any, record: str, path: Path) -> None:
    for field, text in _strings(data):
        why = unplain_string(field, text)
        if why:
            raise program_refusal(path, f"{why} in {record}")


def _strings(data: Any) -> Iterator[tuple[str, str]]:
    """(field, text) for every string in parsed JSON: a dict key under the field "", a list item
    under its list's field. Iterative: the nesting was bounded by load_json."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                yield "", key
                stack.append((key, item))
        elif isinstance(value, list):
            stack.extend((field, item) for item in value)
        elif isinstance(value, str):
            yield field, value


@contextlib.contextmanager
def _weights_only_loads():
    """Force every `torch.load` inside (including torch.export's own fallbacks) to weights_only=True."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old
