"""The per-item work of `hiposeg prepare`, run in worker processes: one (image, label) pair in,
its prepared files and journal record out.

Why a module of its own: it is what runs in the workers (sent once per worker as a `Job`), and it
is where the speed is: raw values -> fine -> coarse ids with look-up tables (cv2.LUT / numpy
indexing, no per-pixel Python), pixel counts from the raw histogram, both PNGs written atomically,
the image symlinked (or copied).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hiposeg.atomic import TMP_PREFIX, atomic_open, atomic_write_bytes
from hiposeg.data.codecs import BadFile, encode_png, probe_image
from hiposeg.data.journal import file_signature
from hiposeg.data.layout import output_paths
from hiposeg.data.options import UnknownPolicy
from hiposeg.data.sources import Decoded, Item
from hiposeg.hierarchy import Hierarchy


@dataclass(frozen=True)
class Job:
    """Everything a worker needs; sent once per worker process."""

    out: Path
    reader: Callable[[Path], Decoded]
    lut: np.ndarray  # int32 raw -> fine id, -1 = unknown, ignore_index = ignore
    lut_out_fine: np.ndarray  # raw -> fine in the label dtype (unknown -> ignore)
    lut_out_coarse: np.ndarray
    ignore_index: int
    unknown: str
    copy: bool


_JOB: Job | None = None


def init_worker(job: Job) -> None:
    """Keep the job in this worker process (it is sent once, not with every item)."""
    global _JOB
    _JOB = job
    if multiprocessing.parent_process() is not None:
        cv2.setNumThreads(0)  # one process per core: no nested threads (in-process runs keep cv2 as it is)


def convert_in_worker(item: Item) -> dict[str, Any]:
    """`convert_item` with the worker's job: what the pool maps over the items."""
    assert _JOB is not None, "worker not initialised"
    return convert_item(_JOB, item)


HISTOGRAM_SLICE = 1 << 22  # pixels per counting call (see `histogram`)


def histogram(values: np.ndarray) -> np.ndarray:
    """Pixel count per raw value (int64; 256 entries for 8-bit maps, up to the largest value for 16-bit),
    counted in slices: cv2.calcHist counts in float32 (exact below 2^24 per call), and np.bincount
    copies its input as int64, which for a label map at the pixel limit (2^28) would take 2 GB."""
    flat = values.reshape(-1)
    hist = np.zeros(256 if values.dtype == np.uint8 else 65536, np.int64)
    for start in range(0, flat.size, HISTOGRAM_SLICE):
        part = flat[start:start + HISTOGRAM_SLICE]
        if values.dtype == np.uint8:
            hist += cv2.calcHist([part.reshape(1, -1)], [0], None, [256], [0, 256]).ravel().astype(np.int64)
        else:
            hist += np.bincount(part, minlength=len(hist))
    if values.dtype == np.uint8:
        return hist
    used = np.flatnonzero(hist)
    return hist[:used[-1] + 1 if used.size else 0]


def apply_lut(values: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """lut[values]; cv2.LUT for 8-bit maps (several times faster than numpy indexing)."""
    if values.dtype == np.uint8 and lut.dtype == np.uint8:
        return cv2.LUT(values, lut[:256])
    return lut[values]


def class_counts(hist: np.ndarray, lut_out: np.ndarray, ignore_index: int) -> tuple[dict[str, int], int]:
    """Pixels per class id (nonzero only) and ignore pixels, from the raw histogram."""
    n = len(hist)
    per = np.bincount(lut_out[:n].astype(np.int64), weights=hist.astype(np.float64))
    counts = {str(i): int(c) for i, c in enumerate(per) if c and i != ignore_index}
    ignore = int(per[ignore_index]) if ignore_index < len(per) else 0
    return counts, ignore


def link_or_copy_image(src: Path, dest: Path, copy: bool) -> list[Any]:
    """Atomically place the image: a symlink to the raw file (default) or a copy."""
    if copy:
        with open(src, "rb") as fin, atomic_open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        return ["copy", dest.stat().st_size]
    target = os.path.abspath(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, dest)
    return ["link", target]


def convert_item(job: Job, item: Item) -> dict[str, Any]:
    """Prepare one pair. Returns its journal record, or a record with "bad"/"unknown"."""
    rec: dict[str, Any] = {"split": item.split, "stem": item.stem,
                           "src": file_signature(item.label) + file_signature(item.image)}
    try:
        decoded = job.reader(item.label)
        values = decoded.values
        h, w = probe_image(item.image)
        if (h, w) != values.shape[:2]:
            raise BadFile(item.label, f"size mismatch: the label is {values.shape[1]}x{values.shape[0]} but its "
                                      f"image {item.image} is {w}x{h} (width x height)")
    except BadFile as e:
        rec["bad"] = {"file": e.file, "reason": e.reason}
        return rec
    hist = histogram(values)
    if decoded.unknown is not None:
        unknown = decoded.unknown
    else:
        idx = np.flatnonzero((hist > 0) & (job.lut[:len(hist)] < 0))
        unknown = {str(int(v)): int(hist[v]) for v in idx}
    if unknown and job.unknown == UnknownPolicy.error.value:
        rec["unknown"] = unknown
        rec["file"] = str(item.label)
        return rec
    fine = encode_png(apply_lut(values, job.lut_out_fine))
    coarse = encode_png(apply_lut(values, job.lut_out_coarse))
    paths = output_paths(job.out, item.split, item.stem, item.image.suffix)
    atomic_write_bytes(paths["fine"], fine)
    atomic_write_bytes(paths["coarse"], coarse)
    rec["image"] = link_or_copy_image(item.image, paths["images"], job.copy)
    rec["image_name"] = paths["images"].name
    rec["fine"] = [len(fine), hashlib.sha256(fine).hexdigest()]
    rec["coarse"] = [len(coarse), hashlib.sha256(coarse).hexdigest()]
    fine_counts, ignore = class_counts(hist, job.lut_out_fine, job.ignore_index)
    coarse_counts, _ = class_counts(hist, job.lut_out_coarse, job.ignore_index)
    rec["pixels"] = {"fine": fine_counts, "coarse": coarse_counts, "ignore": ignore}
    rec["unknown"] = unknown
    return rec


def build_luts(hierarchy: Hierarchy, *, ignore_unevaluated: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw -> fine with -1 for unknown, raw -> fine output, raw -> coarse output)."""
    ignore = hierarchy.ignore_index
    lut = hierarchy.raw_lut(hierarchy.fine_level, unknown="error")
    lut_coarse = hierarchy.raw_lut(hierarchy.coarse_level, unknown="error")
    if ignore_unevaluated:
        leaves = hierarchy.classes(hierarchy.level_names[0])
        for raw, leaf in hierarchy.raw_to_leaf().items():
            if not leaves[leaf].evaluate:
                lut[raw] = lut_coarse[raw] = ignore
    dtype = hierarchy.label_dtype
    out_fine = np.where(lut < 0, ignore, lut).astype(dtype)
    out_coarse = np.where(lut_coarse < 0, ignore, lut_coarse).astype(dtype)
    return lut, out_fine, out_coarse
