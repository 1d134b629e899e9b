"""Checkpoints of plain data, written atomically and read only with `torch.load(weights_only=True)`.

A training checkpoint is a dict of tensors, numbers, strings, lists and dicts:

    format, hiposeg_version, torch_version, iteration (completed), config (TrainConfig as JSON data),
    hierarchy (normalised dict) + hierarchy_sha256, model (segmenter state dict), projection
    (head state dict or {}), memory (prototype buffers), optimizer, scaler, rng, best, last_eval

Nothing in it needs pickle's code execution, so loading refuses any file that would (a
`__reduce__` payload, a pickled class) before running a byte of it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from hiposeg.errors import UserError
from hiposeg.io import atomic_save

CHECKPOINT_FORMAT = "hiposeg-checkpoint/1"
MODEL_FORMAT = "hiposeg-model/1"


def save(obj: dict[str, Any], path: Path) -> None:
    """torch.save into a temp file, fsync, rename: the previous file survives any failure."""
    try:
        atomic_save(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:
        cause = write_error(e)
        if cause is None:  # not an I/O failure: a bug, keep the traceback
            raise
        raise UserError(f"could not write checkpoint {path}: {cause.strerror or cause}",
                        hint="The previous checkpoint (if any) is intact. Free disk space or choose another --out, "
                             "then resume with --resume.") from None


def write_error(e: BaseException | None) -> OSError | None:
    """The OSError behind a failed write, if any. torch.save's zip writer turns an exception from
    the file's `write()` (e.g. ENOSPC on a full disk) into a RuntimeError ("unexpected pos ...")
    and keeps the OSError only as its `__context__`."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def load(path: str | os.PathLike, *, expect: str | tuple[str, ...] = (CHECKPOINT_FORMAT,),
         map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a hiposeg file safely; every failure is a UserError naming the file and the cause."""
    path = Path(path)
    expect = (expect,) if isinstance(expect, str) else expect
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a checkpoint file",
                        hint="Pass a run directory only where the command accepts one (eval, export, --resume).")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): it was never written completely",
                        hint="Use another checkpoint (e.g. the run's best.pt / last.pt) or retrain.")
    refuse_program(path, expect)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"refusing to load {path}: it contains Python objects that only unsafe unpickling could restore "
            f"({str(e).splitlines()[0][:200]})",
            hint="hiposeg files hold plain data only. Do not load files from untrusted sources; re-export or "
                 "re-save the checkpoint with hiposeg.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})",
                        hint="Use the run's other checkpoint (best.pt / last.pt) or retrain.") from None
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt not in expect:
        raise UserError(f"{path} is not a {' or '.join(expect)} file (format: {fmt!r})",
                        hint="Pass a checkpoint written by `hiposeg train` or a model written by `hiposeg export`.")
    return obj


def refuse_program(path: Path, expect: tuple[str, ...]) -> None:
    """A torch.export or ONNX program where a checkpoint is expected (e.g. one renamed to a run's
    checkpoints/best.pt, or given to `export` or `--resume`) is named as such before torch reads it."""
    from hiposeg.export import detect_format

    kind = detect_format(path)
    if kind != "torch":
        raise UserError(f"{path} is a {kind} program, not a {' or '.join(expect)} file",
                        hint="Pass the run directory or the checkpoint written by `hiposeg train` (eval and predict "
                             "also take exported programs; export and --resume do not).")


def resolve(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint file, or a run directory (-> its `checkpoints/{prefer}.pt`, else the other one)."""
    if prefer not in ("best", "last"):
        raise UserError(f"--checkpoint {prefer!r} is not best or last")
    p = Path(path)
    if p.is_dir():
        order = [prefer, "last" if prefer == "best" else "best"]
        for name in order:
            cand = p / "checkpoints" / f"{name}.pt"
            if cand.exists():
                return cand
        raise UserError(f"no checkpoint in run directory {p} (looked for checkpoints/{order[0]}.pt and {order[1]}.pt)",
                        hint="Train first (`hiposeg train --out DIR`) or pass a checkpoint file.")
    if not p.exists():
        raise UserError(f"no such run directory or checkpoint: {p}")
    return p
