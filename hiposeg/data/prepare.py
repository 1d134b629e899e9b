"""Shared machinery of `hiposeg prepare`: raw release -> prepared dataset (README "Preparing data").

One converter module per release (`cityscapes.py`, `ade20k.py`, ...) only *discovers* the
(image, label) pairs of its layout and says how its label files are decoded. Everything else is
here and is the same for every source:

1. **Check** the input: RAW exists, `--out` is not inside RAW (raw data is never written), the
   output folder is new, empty or provably hiposeg's (its manifest or journal; any other folder is
   refused, even with `--overwrite`, before anything is written there), made by the same command
   (else `--overwrite`, which removes only what hiposeg wrote). One process at a time holds the
   folder (`hiposeg.lock`); the journal is started first, so the folder is recognisably hiposeg's
   before any other file is written.
2. **Convert** each pair in a pool of worker processes (`--workers`, default: all cores): decode
   the label, map raw values -> fine -> coarse ids with look-up tables (cv2.LUT / numpy indexing;
   no per-pixel Python), count pixels per class from the raw histogram, write both PNGs
   atomically (temp file + rename) and symlink (or `--copy`) the image.
3. **Journal** every finished item in `DATA/.prepare-journal.jsonl` from the main process (the
   raw files' size/mtime, the outputs' sizes and sha256, the pixel counts). A rerun verifies each
   record against the files on disk and redoes only what is missing or changed, so a run killed
   at any point resumes where it stopped; temp files of writes in flight are removed.
4. **Manifest**: `DATA/manifest.json` (counts, per-class pixels at both levels, unknown values,
   skipped files, hierarchy hash, options, version) is written last; its presence means "done".

Per-file problems (unreadable, truncated or empty files, FIFOs or devices where a file is expected,
size mismatches, colour labels where an index map is expected, missing partners) are collected and reported together with the file and
the fix; `--skip-bad` skips them instead and lists them in the manifest. Raw values the hierarchy
does not know are an error naming the values and the first files, or, with `--unknown ignore`,
mapped to ignore and counted in the manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import simplejpeg

from hiposeg import __version__
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.atomic import TMP_PREFIX, atomic_open, atomic_write_bytes, atomic_write_json
from hiposeg.lock import LOCK_NAME, DirectoryLock
from hiposeg.safeload import load_json

JOURNAL_NAME = ".prepare-journal.jsonl"
JOURNAL_FORMAT = "hiposeg-prepare-journal/1"
MANIFEST_FORMAT = "hiposeg-prepared/1"
LEVEL_DIRS = ("images", "fine", "coarse")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Options a rerun may change without --overwrite: they change no output byte ("unknown" only matters
# for files holding unknown values, and those records are checked against it one by one).
NON_OUTPUT_OPTIONS = frozenset({"limit", "skip_bad", "workers", "unknown"})
MAX_REPORTED_FILES = 5  # bad files listed in an error message
GRACE_ITEMS = 32  # after the first bad file, look at up to this many more to report several at once


class UnknownPolicy(str, Enum):
    """What to do with raw label values the hierarchy does not list."""

    error = "error"
    ignore = "ignore"


class BadFile(Exception):
    """A problem with one input file. Collected per run; `--skip-bad` skips such files."""

    def __init__(self, file: str | os.PathLike, reason: str, split: str | None = None) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = str(file)
        self.reason = reason
        self.split = split  # set for files found without their partner during discovery

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}


# ==========================================================================================
# Label PNG codec. OpenCV decodes palette PNGs (colour type 3, e.g. Mapillary labels) to RGB;
# the class ids are the palette *indices*. Relabelling the image as grayscale of the same bit
# depth (identical IDAT stream: one sample per pixel either way) makes cv2 return the indices.
# ==========================================================================================

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_GRAY, PNG_PALETTE, PNG_GRAY_ALPHA = 0, 3, 4  # IHDR colour types


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    color_type: int

    @property
    def is_index_map(self) -> bool:
        """One value per pixel: grayscale (8/16-bit) or palette indices."""
        return self.color_type in (PNG_GRAY, PNG_PALETTE)


def png_header(data: bytes) -> PngHeader | None:
    """The IHDR fields, or None if `data` does not start like a PNG file."""
    if len(data) < 29 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    w, h, depth, ctype = struct.unpack(">IIBB", data[16:26])
    return PngHeader(w, h, depth, ctype)


def png_is_complete(data: bytes) -> bool:
    """A PNG ends with its IEND chunk; a truncated download does not."""
    return b"IEND" in data[-64:]


def _palette_as_grayscale(data: bytes) -> bytes:
    """Same image with colour type 0: keep IHDR (patched), the IDAT chunks and IEND only."""
    out = [PNG_SIGNATURE]
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if ctype == b"IHDR":
            body = bytearray(data[pos + 8:pos + 8 + length])
            body[9] = PNG_GRAY
            out.append(struct.pack(">I", length) + b"IHDR" + bytes(body)
                       + struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)) & 0xFFFFFFFF))
        elif ctype in (b"IDAT", b"IEND"):
            out.append(data[pos:end])
        if ctype == b"IEND":
            break
        pos = end
    return b"".join(out)


def decode_label_png(data: bytes) -> np.ndarray | None:
    """Decode a label PNG: grayscale -> values, palette -> indices, colour -> (H, W, C) BGR.

    Returns None if cv2 cannot decode the bytes.
    """
    header = png_header(data)
    if header is not None and header.color_type == PNG_PALETTE:
        gray = cv2.imdecode(np.frombuffer(_palette_as_grayscale(data), np.uint8), cv2.IMREAD_UNCHANGED)
        if gray is not None and header.bit_depth < 8 and gray.max(initial=0) >= 1 << header.bit_depth:
            gray = gray // (255 // ((1 << header.bit_depth) - 1))  # libpng scaled 1/2/4-bit gray to 0..255
        return gray
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def encode_png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - cv2 encodes any 2-D uint8/uint16 array
        raise RuntimeError(f"cv2 could not encode a {array.dtype} array of shape {array.shape} as PNG")
    return buf.tobytes()


# ==========================================================================================
# Reading input files, with the problems a person can act on turned into BadFile.
# ==========================================================================================


_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_regular(mode: int) -> str | None:
    """What a file of this st_mode is when it is not a regular file ("a named pipe (FIFO)", ...), else None."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")


def open_regular(path: Path) -> Any:
    """Open a file for reading in binary mode, only if it is a regular file (after symlinks): a FIFO
    would block the open (and the run) forever, a device could be read forever. Checked with stat
    before opening, and again on the open descriptor (opened non-blocking, so a file swapped for a
    FIFO in between cannot block either). BadFile names the file and what it is."""
    kind = not_regular(os.stat(path).st_mode)
    if kind is None:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        kind = not_regular(os.fstat(fd).st_mode)
        if kind is None:
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise BadFile(path, f"is {kind}, not a regular file: replace it with the real file or remove it")


def read_regular_bytes(path: Path) -> bytes:
    """All bytes of a regular file (see `open_regular`); OSError as from `open`."""
    with open_regular(path) as f:
        return f.read()


def read_bytes(path: Path) -> bytes:
    try:
        data = read_regular_bytes(path)
    except OSError as e:
        raise unreadable(path, e) from None
    if not data:
        raise BadFile(path, "empty file (0 bytes): re-extract or re-download it")
    return data


def read_label_file(path: Path) -> np.ndarray:
    """Decode a label PNG (see `decode_label_png`); BadFile if empty, truncated or corrupt.

    A grey+alpha PNG is an index map that an editor saved with an alpha channel: its grey values are
    the labels when every pixel is opaque; with transparent pixels the labels there are undefined, so
    it is refused (never taken for a colour image)."""
    data = read_bytes(path)
    header = png_header(data)
    if header is None:
        raise BadFile(path, "not a PNG file: label maps must be lossless PNGs")
    if not png_is_complete(data):
        raise BadFile(path, "truncated: the PNG ends before its IEND chunk (incomplete copy or download)")
    values = decode_label_png(data)
    if values is None:
        raise BadFile(path, "corrupt PNG: OpenCV cannot decode it")
    if header.color_type == PNG_GRAY_ALPHA:
        return opaque_grey(values, path)
    return values


def opaque_grey(values: np.ndarray, path: Path) -> np.ndarray:
    """The grey channel of a decoded grey+alpha PNG (OpenCV returns it as B=G=R + alpha), if opaque."""
    alpha = values[..., 3]
    transparent = int(np.count_nonzero(alpha != np.iinfo(values.dtype).max))
    if transparent:
        raise BadFile(path, f"is a grey+alpha PNG with {transparent} transparent or translucent pixel(s): its grey "
                            "values are read as class ids only when every pixel is opaque; save it as a "
                            "single-channel (grey) PNG")
    return np.ascontiguousarray(values[..., 0])


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(f: Any) -> tuple[int, int] | None:
    """(height, width) from the first SOF segment, reading only the headers."""
    if f.read(2) != b"\xff\xd8":
        return None
    while True:
        byte = f.read(1)
        while byte and byte != b"\xff":
            byte = f.read(1)
        while byte == b"\xff":
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        seg = f.read(2)
        if len(seg) < 2:
            return None
        (length,) = struct.unpack(">H", seg)
        if marker in _JPEG_SOF:
            body = f.read(5)
            if len(body) < 5:
                return None
            h, w = struct.unpack(">HH", body[1:5])
            return h, w
        f.seek(length - 2, os.SEEK_CUR)


def probe_image(path: Path) -> tuple[int, int]:
    """(height, width) of an image from its header (PNG, JPEG); checks the file is complete (PNG
    IEND / JPEG EOI) and that a JPEG's compressed data is undamaged. Other formats are decoded by cv2."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BadFile(path, "empty file (0 bytes): re-extract or re-download it")
            head = f.read(32)
            if head.startswith(PNG_SIGNATURE):
                header = png_header(head)
                f.seek(max(0, size - 64))
                if header is None or not png_is_complete(f.read()):
                    raise BadFile(path, "truncated or corrupt PNG image (no IEND chunk at the end)")
                return header.height, header.width
            if head.startswith(b"\xff\xd8"):
                f.seek(0)
                hw = _jpeg_size(f)
                f.seek(max(0, size - 4096))
                if hw is None or b"\xff\xd9" not in f.read():
                    raise BadFile(path, "truncated or corrupt JPEG image (no end-of-image marker)")
                f.seek(0)
                check_jpeg_data(path, f.read())
                return hw
    except OSError as e:
        raise unreadable(path, e) from None
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BadFile(path, "unreadable image: OpenCV cannot decode it")
    return img.shape[0], img.shape[1]


# libjpeg's warnings for damaged compressed data (jerror.h JWRN_JPEG_EOF, JWRN_*_CORRUPT...). Other
# warnings (odd but valid files) and unsupported colour conversions (CMYK) go to OpenCV instead.
JPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file")
# A few padding bytes before the end marker are a harmless encoder quirk (COCO has such files); a
# decoder that stops hundreds of bytes early has read damaged data as codes.
JPEG_TRAILING_PADDING = re.compile(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9")
MAX_PADDING_BYTES = 64


def check_jpeg_data(path: Path, data: bytes) -> None:
    """Entropy-decode the whole JPEG (at 1/8 scale: the Huffman pass is complete, the IDCT mostly
    skipped). libjpeg repairs damaged data with grey blocks and only *warns*, which OpenCV, Pillow and
    torchvision pass on as a stderr line at best; simplejpeg's strict mode turns it into an error.
    Files simplejpeg cannot open (CMYK, unusual subsampling, a broken header) must decode in OpenCV."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, min_factor=8, strict=True)
    except ValueError as e:
        message = str(e)
        padding = JPEG_TRAILING_PADDING.match(message)
        if padding and int(padding.group(1)) <= MAX_PADDING_BYTES:
            return
        if message.startswith(JPEG_DAMAGE):
            raise BadFile(path, f"corrupt JPEG image ({message}): re-extract or re-download it") from None
        if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
            raise BadFile(path, f"corrupt JPEG image ({message}; OpenCV cannot decode it either): "
                                "re-extract or re-download it") from None


def file_signature(path: Path) -> list[int]:
    """[size, mtime_ns]: a raw file that changes after being prepared is prepared again."""
    try:
        st = path.stat()
    except OSError:
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


# ==========================================================================================
# Names that become paths. A split or stem read from a RAW layout, a manifest or a journal names a
# folder or file under --out; one that is not a plain name could reach outside it (`../x`, `/x`).
# ==========================================================================================


def is_plain_name(name: Any) -> bool:
    """A non-empty string naming one entry of a folder: no path separator or NUL, not `.` or `..`
    (which also rules out absolute paths)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name and "/" not in name
            and (os.altsep is None or os.altsep not in name))


def plain_name(name: Any, what: str, source: str | os.PathLike, hint: str) -> str:
    """`name` if `is_plain_name`, else a UserError naming where it was read (`source`) and the fix."""
    if not is_plain_name(name):
        raise UserError(f"{source}: {what} {name!r} is not a plain folder or file name (it must not be empty, "
                        "'.' or '..', nor contain '/' or NUL)", hint=hint)
    return name


def folder_inside(root: Path, folder: Path) -> bool:
    """Whether `folder` is, after resolving symlinks, `root` or below it. A file in it can be removed
    without touching anything outside `root` (unlinking a symlink removes the link only)."""
    real_root, real = os.path.realpath(root), os.path.realpath(folder)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


# ==========================================================================================
# Discovery helpers used by the source modules.
# ==========================================================================================

RAW_NAME_HINT = "Rename the file or folder in RAW."


@dataclass(frozen=True)
class Item:
    """One (image, label) pair to prepare; its split and stem name the output files."""

    split: str
    stem: str
    image: Path
    label: Path

    def __post_init__(self) -> None:
        plain_name(self.split, "split", self.image, RAW_NAME_HINT)
        plain_name(self.stem, "file stem", self.image, RAW_NAME_HINT)


@dataclass
class Discovery:
    """What a source found under RAW."""

    items: dict[str, list[Item]]  # output split -> items sorted by stem
    missing_splits: list[str] = field(default_factory=list)
    orphans: list[BadFile] = field(default_factory=list)  # files without their partner
    notes: list[str] = field(default_factory=list)  # e.g. which layout was detected


def split_folders(found: Discovery, split: str, image_dir: Path, label_dir: Path, raw: Path, expected: str) -> bool:
    """Whether a split's image and label folders both exist. A split with neither is recorded as
    missing (a release may ship only some splits); one with only one of them is an error."""
    has_image = check_dir(image_dir, str(image_dir.relative_to(raw)))
    has_label = check_dir(label_dir, str(label_dir.relative_to(raw)))
    if not has_image and not has_label:
        found.missing_splits.append(split)
        return False
    if not has_image or not has_label:
        missing, present = (image_dir, label_dir) if not has_image else (label_dir, image_dir)
        raise UserError(f"{missing} is missing but {present} exists",
                        hint=f"Expected {expected}. Unpack the missing part of the release.")
    return True


def unreadable(path: Path, e: OSError) -> BadFile:
    """The BadFile for an OSError while reading an input file."""
    if isinstance(e, FileNotFoundError):
        return BadFile(path, "file not found (removed while preparing?)")
    if e.errno == errno.ELOOP:
        return BadFile(path, "symlink loop: the link points (eventually) back to itself")
    return BadFile(path, f"cannot read: {e.strerror or e}")


def check_dir(path: Path, what: str) -> bool:
    """True if `path` is a directory; UserError for a symlink loop or a broken link."""
    if path.is_dir():
        return True
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"symlink loop in RAW: {path} ({what}) points back to itself",
                                hint="Fix or remove that link (`ls -l` shows where it points).") from None
            raise UserError(f"broken symlink in RAW: {path} ({what}) -> {os.readlink(path)}",
                            hint="Point the link at the real folder, or remove it.") from None
    return False


def list_files(directory: Path, suffixes: Iterable[str], strip: str = "") -> dict[str, Path]:
    """{stem: path} of the files in `directory` (not recursive) whose name ends with one of
    `suffixes` (case-insensitive); `strip` removes a fixed name ending from the stem. Two files with
    one stem (`t0.jpg` and `t0.png`) are a UserError naming both: files pair by stem."""
    suffixes = tuple(s.lower() for s in suffixes)
    out: dict[str, Path] = {}
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot list {directory}: {e.strerror or e}") from None
    for e in entries:
        name = e.name
        if name.startswith(".") or not name.lower().endswith(suffixes):
            continue
        stem = name[: -len(strip)] if strip and name.endswith(strip) else os.path.splitext(name)[0]
        add_unique(out, stem, Path(e.path))
    return out


def add_unique(files: dict[str, Path], stem: str, path: Path) -> None:
    """files[stem] = path; a UserError naming both files if the stem is taken already."""
    if stem in files:
        raise UserError(f"two files with the stem {stem!r}: {files[stem]} and {path}; hiposeg pairs images and "
                        "labels by file stem, so it cannot tell which one to use",
                        hint="Remove or rename one of them (or move it out of RAW).")
    files[stem] = path


def list_subdirs(directory: Path) -> list[Path]:
    """Sub-folders (not hidden), sorted; links that loop or dangle are a UserError."""
    try:
        entries = [Path(e.path) for e in os.scandir(directory) if not e.name.startswith(".")]
    except OSError as e:
        raise UserError(f"cannot list {directory}: {e.strerror or e}") from None
    return sorted(p for p in entries if check_dir(p, "folder"))


def pair_by_stem(split: str, images: dict[str, Path], labels: dict[str, Path], label_for: Callable[[Path], Path],
                 image_for: Callable[[Path], Path]) -> tuple[list[Item], list[BadFile]]:
    """Items for stems present on both sides; a BadFile for each file without its partner, naming
    the partner path that was expected (`label_for(image)`, `image_for(label)`)."""
    items = [Item(split, s, images[s], labels[s]) for s in sorted(images.keys() & labels.keys())]
    orphans = [BadFile(images[s], f"missing partner: no label {label_for(images[s])}", split)
               for s in sorted(images.keys() - labels.keys())]
    orphans += [BadFile(labels[s], f"missing partner: no image {image_for(labels[s])}", split)
                for s in sorted(labels.keys() - images.keys())]
    return items, orphans


def partner_in(directory: Path, suffix: str) -> Callable[[Path], Path]:
    """`path -> directory / (stem + suffix)`, for `pair_by_stem` messages."""
    return lambda p: directory / (p.stem + suffix)


def describe_dir(path: Path, limit: int = 8) -> str:
    """A short listing for 'found: ...' in layout errors."""
    try:
        names = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(path) if not e.name.startswith("."))
    except OSError:
        return "(cannot list)"
    if not names:
        return "(empty)"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ==========================================================================================
# Sources: one subclass per release layout.
# ==========================================================================================


@dataclass(frozen=True)
class Decoded:
    """A label map in raw values. `unknown`, when given, names what the reader could not map
    (e.g. colours of a colour mask) and replaces the value-based report."""

    values: np.ndarray
    unknown: dict[str, int] | None = None


@dataclass(frozen=True)
class IndexLabelReader:
    """Single-channel label PNGs: 8/16-bit grayscale, or palette PNGs read as indices."""

    expected: str  # what a label file of this source is, for the message on a colour PNG

    def __call__(self, path: Path) -> Decoded:
        values = read_label_file(path)
        if values.ndim != 2:
            raise BadFile(path, f"is a {values.shape[2]}-channel colour image, but a single-channel index map "
                                f"was expected ({self.expected})")
        return Decoded(values)


class Source:
    """A release layout. Subclasses set the class attributes and implement `discover`."""

    name: ClassVar[str]  # converter name (CLI command, manifest "source")
    default_hierarchy: ClassVar[str]  # built-in hierarchy name
    splits: ClassVar[tuple[str, ...]] = ("train", "val")  # output splits a full release has
    label_expected: ClassVar[str] = "one-channel PNG of label ids"

    def discover(self, raw: Path) -> Discovery:
        raise NotImplementedError

    def check(self, raw: Path, hierarchy: Hierarchy) -> None:
        """Source-specific consistency checks between RAW and the hierarchy (e.g. a config)."""

    def options(self) -> dict[str, Any]:
        """Source-specific options recorded in the manifest (they must match on resume)."""
        return {}

    def reader(self, hierarchy: Hierarchy) -> Callable[[Path], Decoded]:
        return IndexLabelReader(self.label_expected)

    def command(self, raw: Path | str, out: Path | str) -> str:
        return f"hiposeg prepare {self.name} {raw} --out {out}"


# ==========================================================================================
# The per-item work, run in worker processes.
# ==========================================================================================


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


def _init_worker(job: Job) -> None:
    global _JOB
    _JOB = job
    if multiprocessing.parent_process() is not None:
        cv2.setNumThreads(0)  # one process per core: no nested threads (in-process runs keep cv2 as it is)


def _convert_in_worker(item: Item) -> dict[str, Any]:
    assert _JOB is not None, "worker not initialised"
    return convert_item(_JOB, item)


def histogram(values: np.ndarray) -> np.ndarray:
    """Pixel count per raw value (int64)."""
    if values.dtype == np.uint8 and values.size < 1 << 24:  # calcHist counts in float32: exact below 2^24
        return cv2.calcHist([values], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return np.bincount(values.ravel(), minlength=256 if values.dtype == np.uint8 else 0).astype(np.int64)


def apply_lut(values: np.ndarray, lut: np.ndarray) -> np.ndarray:
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


def output_paths(out: Path, split: str, stem: str, image_suffix: str) -> dict[str, Path]:
    return {"images": out / split / "images" / f"{stem}{image_suffix}",
            "fine": out / split / "fine" / f"{stem}.png",
            "coarse": out / split / "coarse" / f"{stem}.png"}


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


# ==========================================================================================
# Parallel map with a bounded window of tasks in flight.
# ==========================================================================================


class WorkerPool:
    """`imap_unordered` over a process pool (or in-process for workers=1).

    Keeps at most `window` tasks in flight, so `stop()` (e.g. after a bad file) lets the tasks
    already running finish and submits no more. A worker that dies (killed, out of memory)
    raises UserError: the finished items are journaled, so rerunning resumes.
    """

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> None:
        self.workers = max(1, workers)
        self.initializer, self.initargs = initializer, initargs
        self._stopping = False
        self._executor: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        if self.workers > 1:
            self._executor = cf.ProcessPoolExecutor(self.workers, mp_context=_mp_context(),
                                                    initializer=self.initializer, initargs=self.initargs)
            self._executor.submit(int).result()  # start the workers now, before any progress-bar thread
        else:
            self.initializer(*self.initargs)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        self._stopping = True

    def imap_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        if self._executor is None:
            for t in tasks:
                if self._stopping:
                    return
                yield fn(t)
            return
        it = iter(tasks)
        pending: set[cf.Future] = set()
        window = 4 * self.workers
        try:
            while True:
                while not self._stopping and len(pending) < window:
                    t = next(it, None)
                    if t is None:
                        break
                    pending.add(self._executor.submit(fn, t))
                if not pending:
                    return
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        except cf.process.BrokenProcessPool:
            raise UserError("a worker process died unexpectedly (killed, or out of memory); the files finished so "
                            "far are kept",
                            hint="Rerun the same command to resume, with fewer --workers if memory is short.") from None
        finally:
            for fut in pending:
                fut.cancel()


def _mp_context() -> multiprocessing.context.BaseContext:
    """fork starts a pool in ~0.03 s (the workers inherit the imported modules) and is safe while
    this process runs no other thread; otherwise forkserver (~0.5 s: workers start clean), with
    this module preloaded in the server."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def progress_bar(quiet: bool):  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=quiet)


# ==========================================================================================
# The journal: one JSON line per finished item, written by the main process only.
# ==========================================================================================


class Journal:
    """Append-only record of finished items; the first line describes the run (header)."""

    def __init__(self, path: Path, header: dict[str, Any], records: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.path, self.header, self.records = path, header, records
        self._f = None
        self._last_sync = 0.0

    @staticmethod
    def read(path: Path, *, strict: bool = True) -> tuple[dict[str, Any] | None, dict[tuple[str, str], dict[str, Any]]]:
        """(header, records by (split, stem)); header None if there is no journal or it is not hiposeg's.

        A line that is not JSON was cut short by a kill: skipped, its item is redone. A JSON line that
        is not a record hiposeg writes (the journal was edited) is a UserError when `strict`, else
        skipped, so --overwrite can still clear what the valid records name."""
        if path.is_symlink():
            raise UserError(f"{path} is a symlink; hiposeg writes its journal as a file and never appends "
                            "through a link", hint="Remove the link, or choose another --out.")
        try:
            f = open_regular(path)
        except FileNotFoundError:
            return None, {}
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}", hint="Choose an --out you can read.") from None
        except BadFile as e:
            raise UserError(f"{e}", hint="hiposeg writes its journal as a regular file: remove this one, or "
                                         "choose another --out.") from None
        header, records = None, {}
        with f:
            for n, raw_line in enumerate(f, 1):
                obj = _json_line(raw_line, path, n)
                if n == 1:
                    header = obj if journal_header_problem(obj) is None else None
                    if header is None:
                        break
                    continue
                if obj is None:
                    continue
                problem = journal_record_problem(obj)
                if problem is None:
                    records[(obj["split"], obj["stem"])] = obj
                elif strict:
                    raise UserError(f"{path}, line {n}: not a record hiposeg writes ({problem})",
                                    hint=f"The journal was edited. Rerun with --overwrite to prepare "
                                         f"{path.parent} again (hiposeg removes only the files its valid "
                                         "records name), or choose another --out.")
        return header, records

    @staticmethod
    def create(path: Path, header: dict[str, Any]) -> None:
        """Start a journal (atomically): from here on the folder is recognisably hiposeg's."""
        with atomic_open(path, "w") as f:
            f.write(json.dumps(header) + "\n")

    def open_for_append(self) -> None:
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        # a record cut short by a kill would glue onto the next one: end it with a newline
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._f.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        assert self._f is not None
        self.records[(record["split"], record["stem"])] = record
        try:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._f.flush()
            now = time.monotonic()
            if now - self._last_sync > 2.0:
                os.fsync(self._f.fileno())
                self._last_sync = now
        except OSError as e:  # e.g. a full disk: a failed write() names no file
            e.filename = e.filename or str(self.path)
            raise

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None  # closed even if the flush fails (a second close is a no-op)
            with f:
                f.flush()
                os.fsync(f.fileno())


def _json_line(line: bytes, path: Path, n: int) -> Any:
    """One journal line parsed with bounded nesting; None if it is not JSON (cut short by a kill)."""
    try:
        return load_json(line, f"{path}, line {n}")
    except UserError:
        return None


def journal_header_problem(obj: Any) -> str | None:
    """Why `obj` is not the first line of a hiposeg journal, or None."""
    if not isinstance(obj, dict) or obj.get("journal") != JOURNAL_FORMAT:
        return f'no "journal": "{JOURNAL_FORMAT}"'
    if not isinstance(obj.get("source"), str) or not isinstance(obj.get("options"), dict):
        return "no source or options"
    return None


def journal_record_problem(obj: Any) -> str | None:
    """Why `obj` is not a journal record as `convert_item` / `run_jobs` write them, or None."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    for key in ("split", "stem"):
        if not is_plain_name(obj.get(key)):
            return f"{key} {obj.get(key)!r} is not a plain folder or file name"
    if not _ints(obj.get("src"), 4):
        return "src is not 4 integers"
    if "skipped" in obj:
        bad = obj["skipped"]
        ok = isinstance(bad, dict) and isinstance(bad.get("file"), str) and isinstance(bad.get("reason"), str)
        return None if ok else "skipped is not {file, reason}"
    image = obj.get("image")
    kinds = (("link", str), ("copy", int))
    if not (isinstance(image, list) and len(image) == 2 and (image[0], type(image[1])) in kinds):
        return "image is not [link, target] or [copy, size]"
    name = obj.get("image_name")
    if "image_name" in obj and not (is_plain_name(name) and os.path.splitext(name)[0] == obj["stem"]):
        return f"image_name {name!r} is not the stem plus an extension"
    for level in ("fine", "coarse"):
        v = obj.get(level)
        if not (isinstance(v, list) and len(v) == 2 and _ints(v[:1], 1) and isinstance(v[1], str)):
            return f"{level} is not [size, sha256]"
    pixels = obj.get("pixels")
    if not (isinstance(pixels, dict) and _counts(pixels.get("fine"), ids=True)
            and _counts(pixels.get("coarse"), ids=True) and _ints([pixels.get("ignore")], 1)):
        return "pixels is not {fine, coarse, ignore} counts"
    return None if _counts(obj.get("unknown"), ids=False) else "unknown is not {value: count}"


def _ints(values: Any, n: int) -> bool:
    return isinstance(values, list) and len(values) == n and all(type(v) is int for v in values)


def _counts(d: Any, *, ids: bool) -> bool:
    """{key: int} (keys decimal class ids when `ids`)."""
    return isinstance(d, dict) and all(type(v) is int and (not ids or (k.isascii() and k.isdigit()))
                                       for k, v in d.items())


def record_is_current(rec: dict[str, Any], item: Item, out: Path, copy: bool) -> bool:
    """A journaled item is done if its raw files are unchanged and its outputs are on disk as
    journaled: label PNGs with the same size and sha256 (they are small: hashing them costs little
    next to decoding), the image link with the same target (a copy: the same size)."""
    if "skipped" in rec or rec.get("src") != file_signature(item.label) + file_signature(item.image):
        return False
    paths = output_paths(out, item.split, item.stem, item.image.suffix)
    for level in ("fine", "coarse"):
        size, digest = rec[level]
        try:
            data = read_regular_bytes(paths[level])
        except (OSError, BadFile):
            return False
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            return False
    kind, value = rec["image"]
    try:
        if kind == "link":
            return not copy and os.readlink(paths["images"]) == value
        return copy and not paths["images"].is_symlink() and paths["images"].stat().st_size == value
    except OSError:
        return False


# ==========================================================================================
# The output folder: whose it is, and what hiposeg wrote there. A folder is hiposeg's only if it
# holds a hiposeg manifest or journal; --overwrite then removes only the files those record (or,
# for the synthetic set, the files of its naming scheme), never anything else a user put there.
# ==========================================================================================

MANIFEST_NAME = "manifest.json"
HIERARCHY_NAME = "hierarchy.json"
OWN_FILES = (JOURNAL_NAME, MANIFEST_NAME, HIERARCHY_NAME)
MANIFEST_KEYS = frozenset({"format", "hiposeg_version", "source", "raw_root", "hierarchy", "levels", "ignore_index",
                           "options", "splits", "missing_splits", "created"})
SYNTHETIC_STEM = re.compile(r"^synthetic_(?P<split>.+)_\d{5,}\.png$")  # synthetic.stem_of + ".png"


@dataclass
class OutputFolder:
    """What --out holds, read without writing anything."""

    path: Path
    entries: list[str]  # its entries except hiposeg's lock and temp files
    manifest: dict[str, Any] | None  # a hiposeg manifest
    manifest_problem: str | None  # why manifest.json (when present) is not one
    journal_header: dict[str, Any] | None
    records: dict[tuple[str, str], dict[str, Any]]

    @property
    def owned(self) -> bool:
        return self.manifest is not None or self.journal_header is not None

    @property
    def source(self) -> str | None:
        """The source that made the dataset (the manifest's, else the journal's)."""
        made_by = self.manifest or self.journal_header or {}
        return made_by.get("source")

    @property
    def splits(self) -> set[str]:
        return set(self.manifest["splits"] if self.manifest else ()) | {s for s, _ in self.records}


def inspect_output(out: Path, *, strict: bool = True) -> OutputFolder:
    """The state of `out` (see OutputFolder); `strict`: as in `Journal.read`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder", hint="Choose another --out.")
    try:
        entries = sorted(e for e in os.listdir(out) if not is_scratch(e)) if out.is_dir() else []
    except OSError as e:
        raise UserError(f"cannot list --out {out}: {e.strerror or e}", hint="Choose a folder you can read.") from None
    manifest, problem = read_own_manifest(out / MANIFEST_NAME)
    header, records = Journal.read(out / JOURNAL_NAME, strict=strict)
    return OutputFolder(out, entries, manifest, problem, header, records)


def is_scratch(name: str) -> bool:
    """hiposeg's lock file and the temp files of its own top-level files (a run killed mid-write)."""
    if name == LOCK_NAME:
        return True
    return bool(OWN_TEMP.match(name)) and any(name[len(TMP_PREFIX):].startswith(f + ".") for f in OWN_FILES)


def read_own_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the manifest, None) if `path` is a hiposeg manifest; (None, why not, naming the file) if it is
    something else; (None, None) if there is none."""
    try:
        data = load_json(read_regular_bytes(path), str(path))
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path}: {e.strerror or e}"
    except (BadFile, UserError) as e:
        return None, str(e).splitlines()[0]
    problem = manifest_problem(data)
    return (data, None) if problem is None else (None, f"{path}: {problem}")


def manifest_problem(data: Any) -> str | None:
    """Why `data` is not a manifest as `manifest_dict` writes it, or None."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return f'it has no "format": "{MANIFEST_FORMAT}"'
    missing = sorted(MANIFEST_KEYS - data.keys())
    if missing:
        return f"it lacks {', '.join(missing)}"
    if not isinstance(data["source"], str) or not isinstance(data["options"], dict):
        return "its source or options are malformed"
    if not isinstance(data["splits"], dict) or not all(is_plain_name(s) for s in data["splits"]):
        return f"its splits {list(data['splits'])[:5] if isinstance(data['splits'], dict) else data['splits']!r} " \
               "are not plain folder names"
    return None


def check_may_write(state: OutputFolder, suggestion: str) -> None:
    """Refuse a non-empty folder that is not provably hiposeg's, even with --overwrite."""
    if not state.entries or state.owned:
        return
    reasons = [state.manifest_problem] if state.manifest_problem else []
    if (state.path / JOURNAL_NAME).exists() and state.journal_header is None:
        reasons.append(f"{state.path / JOURNAL_NAME}: no hiposeg journal header")
    why = f" ({'; '.join(reasons)})" if reasons else ""
    shown = ", ".join(state.entries[:5]) + (f", ... ({len(state.entries)} entries)" if len(state.entries) > 5 else "")
    raise UserError(f"--out {state.path} is not empty and holds no hiposeg prepared dataset{why}; refusing to write "
                    f"into it, even with --overwrite (it holds: {shown})",
                    hint=f"Choose an empty or new folder, e.g. --out {suggestion}.")


def recorded_outputs(out: Path, rec: dict[str, Any]) -> list[Path]:
    """The files a journal record says hiposeg wrote (none for a file skipped as bad)."""
    if "skipped" in rec:
        return []
    base = out / rec["split"]
    files = [base / "fine" / f"{rec['stem']}.png", base / "coarse" / f"{rec['stem']}.png"]
    name = recorded_image_name(rec)
    return files + [base / "images" / name] if name else files


def recorded_image_name(rec: dict[str, Any]) -> str | None:
    """The output image's file name: recorded, or (records written before it was) the stem plus the
    suffix of the link's target; None when unknown (such a record of a copied image)."""
    kind, value = rec["image"]
    name = rec.get("image_name") or (rec["stem"] + os.path.splitext(value)[1] if kind == "link" else None)
    return name if is_plain_name(name) and os.path.splitext(name)[0] == rec["stem"] else None


def synthetic_outputs(out: Path, splits: Iterable[str]) -> list[Path]:
    """The files of the synthetic set's naming scheme (`synthetic_{split}_{index}.png`) in its split folders."""
    files = []
    for split in splits:
        for d in _split_dirs(out, [split]):
            with contextlib.suppress(OSError):
                files += [d / n for n in os.listdir(d) if (m := SYNTHETIC_STEM.match(n)) and m["split"] == split]
    return files


def remove_own_file(out: Path, path: Path) -> None:
    """Unlink a file hiposeg wrote (a symlink: the link only) if it lies inside `out` and is not a folder."""
    if not folder_inside(out, path.parent):
        return
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)


def clear_prepared(state: OutputFolder, header: dict[str, Any]) -> list[str]:
    """--overwrite: remove what hiposeg wrote in `state.path` and start a new journal with `header`.

    Removed: the manifest (first: a half-cleared folder is never taken for a finished dataset), the
    outputs the journal records (the synthetic set's by their names), temp files, hierarchy.json and
    the split folders this leaves empty. The caller then starts the new journal: the old one stays
    until then (or, when there is none, `header` starts one first), so the folder is recognisably
    hiposeg's throughout. Returns the files kept (relative paths): those hiposeg did not write."""
    out = state.path
    synthetic = state.source == "synthetic"
    if state.journal_header is None and not synthetic:
        raise UserError(f"{out} holds a prepared dataset without its journal ({JOURNAL_NAME}), so hiposeg cannot "
                        "tell which of the files there it wrote; it removes nothing",
                        hint=f"Remove {out} yourself (keep what you need from it), or choose another --out.")
    if state.journal_header is None:
        Journal.create(out / JOURNAL_NAME, header)
    remove_own_file(out, out / MANIFEST_NAME)
    for rec in state.records.values():
        for path in recorded_outputs(out, rec):
            remove_own_file(out, path)
    splits = state.splits | ({"train", "val"} if synthetic else set())
    for path in synthetic_outputs(out, splits) if synthetic else []:
        remove_own_file(out, path)
    for d in _split_dirs(out, splits):
        if folder_inside(out, d):
            remove_temp_files(d)
    remove_own_file(out, out / HIERARCHY_NAME)
    remove_empty_split_dirs(out, splits)
    return user_files(out)


def check_split_dirs_inside(out: Path, splits: Iterable[str]) -> None:
    """Outputs are written only inside `out`: a split folder (or images/fine/coarse folder) that is a
    symlink leading elsewhere would make hiposeg write over files outside it."""
    for split in splits:
        for d in [out / split, *_split_dirs(out, [split])]:
            if d.exists() and not folder_inside(out, d):
                raise UserError(f"{d} leads outside --out {out} (to {os.path.realpath(d)}); hiposeg writes only "
                                "inside --out", hint="Remove that link, or choose another --out.")


def remove_empty_split_dirs(out: Path, splits: Iterable[str]) -> None:
    """rmdir the images/fine/coarse folders and split folders that are empty (never a symlink's target)."""
    for split in splits:
        for d in [*_split_dirs(out, [split]), out / split]:
            if not d.is_symlink() and folder_inside(out, d):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty


def user_files(out: Path) -> list[str]:
    """Files under `out` that are not hiposeg's bookkeeping (symlinked folders are not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        found += [os.path.normpath(os.path.join(rel, n)) for n in filenames
                  if rel != "." or n not in (LOCK_NAME, JOURNAL_NAME)]
        found += [os.path.normpath(os.path.join(rel, n)) for n in dirnames if os.path.islink(os.path.join(dirpath, n))]
    return sorted(found)


def kept_note(out: Path, kept: list[str]) -> list[str]:
    """The summary line for files --overwrite left in place."""
    if not kept:
        return []
    shown = ", ".join(kept[:5]) + (f", ... ({len(kept)} in all)" if len(kept) > 5 else "")
    return [f"--overwrite kept {len(kept)} file(s) in {out} that hiposeg did not write: {shown}"]


def remove_scratch(out: Path) -> None:
    """Temp files of hiposeg's top-level files left by a killed run (the lock file stays)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(out):
            if name != LOCK_NAME and is_scratch(name):
                remove_own_file(out, out / name)


# ==========================================================================================
# The driver.
# ==========================================================================================


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


def check_out_not_in_raw(raw: Path, out: Path) -> None:
    r, o = raw.resolve(), out.resolve()
    if o == r or r in o.parents:
        raise UserError(f"--out {out} is inside the raw release {raw}; hiposeg never writes under RAW",
                        hint="Choose an output folder outside RAW (the default is data/DATASET).")
    if o in r.parents:
        raise UserError(f"the raw release {raw} is inside --out {out}; preparing (or --overwrite) there could "
                        "touch the raw files", hint="Choose an --out folder that does not contain RAW.")


def _split_dirs(out: Path, splits: Iterable[str]) -> list[Path]:
    return [out / s / d for s in splits for d in LEVEL_DIRS]


# hiposeg's temp names: `hiposeg.atomic.atomic_open` (mkstemp: 8 random characters) and the image links
# (`link_or_copy_image`: the pid) append a dot and a tag to `.tmp-NAME`.
OWN_TEMP = re.compile(re.escape(TMP_PREFIX) + r".+\.(?:[a-z0-9_]{8}|\d+)$")


def remove_temp_files(directory: Path) -> int:
    """Remove temp files (and temp symlinks) left by writes in flight when a run was killed: only
    names of hiposeg's temp-name pattern, never a folder."""
    n = 0
    if directory.is_dir():
        for e in os.scandir(directory):
            if OWN_TEMP.match(e.name) and not e.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                    n += 1
    return n


def open_output(out: Path, header: dict[str, Any], source: Source, raw: Path, overwrite: bool,
                splits: Iterable[str]) -> tuple[Journal, list[str]]:
    """Under the folder's lock: check `out` may be written (its `splits` folders included), clear it for
    --overwrite, and return its journal (started, so the folder is recognisably hiposeg's before
    anything else is written) and the files --overwrite kept."""
    state = inspect_output(out, strict=not overwrite)
    check_may_write(state, f"data/{source.name}")
    check_split_dirs_inside(out, splits)
    remove_scratch(out)
    journal_path = out / JOURNAL_NAME
    if not state.entries or overwrite:
        kept = clear_prepared(state, header) if state.entries else []
        Journal.create(journal_path, header)
        return Journal(journal_path, header, {}), kept
    if state.journal_header is None:
        raise UserError(f"{out} already holds a prepared dataset ({state.source}) made without a resumable journal",
                        hint=f"Add --overwrite to prepare it again from {raw}, or choose another --out.")
    mismatch = [k for k in ("source", "hierarchy_sha256", "options")
                if _comparable(state.journal_header.get(k)) != _comparable(header.get(k))]
    if mismatch:
        was = {k: state.journal_header.get(k) for k in mismatch}
        now = {k: header.get(k) for k in mismatch}
        raise UserError(f"{out} was prepared with different settings: {_diff_text(was, now)}",
                        hint="Add --overwrite to prepare it again with the new settings, or choose another --out.")
    return Journal(journal_path, header, state.records), []


def _comparable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: x for k, x in v.items() if k not in NON_OUTPUT_OPTIONS}
    return v


def _diff_text(was: dict[str, Any], now: dict[str, Any]) -> str:
    parts = []
    for k in was:
        a, b = _comparable(was[k]), _comparable(now[k])
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(a.keys() | b.keys()):
                if a.get(key) != b.get(key):
                    parts.append(f"{key}: was {a.get(key)!r}, now {b.get(key)!r}")
        elif k == "hierarchy_sha256":
            parts.append("the hierarchy differs (different class tree or raw mapping)")
        else:
            parts.append(f"{k}: was {a!r}, now {b!r}")
    return "; ".join(parts)


@dataclass
class RunOutcome:
    done: int = 0
    bad: list[BadFile] = field(default_factory=list)
    unknown: list[tuple[str, dict[str, int]]] = field(default_factory=list)


def prepare(source: Source, raw: Path, out: Path, *, hierarchy: Hierarchy | str | None = None,
            workers: int | None = None, limit: int | None = None, copy: bool = False, overwrite: bool = False,
            unknown: UnknownPolicy | str = UnknownPolicy.error, skip_bad: bool = False,
            ignore_unevaluated: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Convert a raw release into a prepared dataset at `out`; returns the manifest."""
    raw, out = Path(raw), Path(out)
    unknown = UnknownPolicy(unknown).value
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} must be at least 1")
    if not check_dir(raw, "RAW"):
        raise UserError(f"raw release folder not found: {raw}" if not raw.exists() else f"RAW {raw} is not a folder",
                        hint=f"Give the folder of the {source.name} release: `{source.command('RAW', out)}` "
                             f"(`hiposeg prepare {source.name} --help` shows the layout).")
    check_out_not_in_raw(raw, out)
    h = hierarchy if isinstance(hierarchy, Hierarchy) else Hierarchy.load(hierarchy or source.default_hierarchy)
    source.check(raw, h)
    found = source.discover(raw)
    selected = {s: items[:limit] if limit else items for s, items in found.items.items()}
    options = {"unknown": unknown, "ignore_unevaluated": ignore_unevaluated, "copy": copy, "limit": limit,
               "skip_bad": skip_bad, **source.options()}
    header = {"journal": JOURNAL_FORMAT, "source": source.name, "raw_root": str(raw.resolve()),
              "hierarchy_name": h.name, "hierarchy_sha256": h.sha256, "options": options}
    if found.orphans and not skip_bad:
        raise _bad_files_error(found.orphans)
    if not any(selected.values()) and not found.orphans:
        raise UserError(f"no {source.name} image/label pairs found under {raw}",
                        hint=f"`hiposeg prepare {source.name} --help` shows the expected layout.")
    check_may_write(inspect_output(out, strict=not overwrite), f"data/{source.name}")  # before the lock writes
    resume_hint = source.command(raw, out)
    with DirectoryLock(out, "prepared dataset folder"), output_errors(out, resume_hint):
        journal, kept = open_output(out, header, source, raw, overwrite, selected)
        for d in _split_dirs(out, selected):
            remove_temp_files(d)
        if not (out / HIERARCHY_NAME).exists():
            atomic_write_json(out / HIERARCHY_NAME, h.to_dict())
        todo = [it for items in selected.values() for it in items
                if not _is_done(journal, it, out, copy=copy, skip_bad=skip_bad, unknown=unknown)]
        remove_renamed_images(journal, todo, out)
        total = sum(len(v) for v in selected.values())
        lut, lut_fine, lut_coarse = build_luts(h, ignore_unevaluated=ignore_unevaluated)
        job = Job(out=out, reader=source.reader(h), lut=lut, lut_out_fine=lut_fine, lut_out_coarse=lut_coarse,
                  ignore_index=h.ignore_index, unknown=unknown, copy=copy)
        outcome = run_jobs(job, todo, total, journal, workers=min(workers or default_workers(), max(1, len(todo))),
                           skip_bad=skip_bad, quiet=quiet, label=f"prepare {source.name}", resume_hint=resume_hint)
        if outcome.unknown:
            raise _unknown_values_error(outcome.unknown, h)
        if outcome.bad:
            raise _bad_files_error(outcome.bad)
        manifest = build_manifest(source, raw, h, options, found, journal)
        atomic_write_json(out / MANIFEST_NAME, manifest)
    manifest["_run"] = {"converted": outcome.done, "reused": total - len(todo),
                        "notes": found.notes + kept_note(out, kept)}
    return manifest


def remove_renamed_images(journal: Journal, todo: list[Item], out: Path) -> None:
    """An item redone under another image name (`t0.jpg` became `t0.png` in RAW) must not leave the
    old image output beside the new one: a loader pairing by stem could pick the stale one."""
    for item in todo:
        rec = journal.records.get((item.split, item.stem))
        old = recorded_image_name(rec) if rec and "skipped" not in rec else None
        if old is not None and old != item.stem + item.image.suffix:
            remove_own_file(out, out / item.split / "images" / old)


@contextlib.contextmanager
def output_errors(out: Path, resume_hint: str) -> Iterator[None]:
    """An OSError while writing under --out (read-only, full, permissions) as one UserError naming
    the file and the fix; writes are atomic, so nothing partial is left."""
    try:
        yield
    except OSError as e:
        raise write_error(e, out, resume_hint) from None


def write_error(e: OSError, out: Path, command: str, done: int | None = None) -> UserError:
    """The UserError for a failed write under `out`, with a fix that fits the cause."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free disk space (or choose an --out on another disk)"
    elif e.errno == errno.EROFS:
        fix = f"{out} is on a read-only file system: choose an --out on a writable disk"
    elif e.errno in (errno.EACCES, errno.EPERM):
        fix = f"Make {out} writable for you, or choose another --out"
    else:
        fix = "Fix the cause, or choose another --out"
    kept = f"The {done} files finished so far are kept" if done is not None else "Finished files are kept"
    return UserError(f"cannot write {e.filename or out}: {e.strerror or e}",
                     hint=f"{fix}. {kept} and no partial file is left: then rerun the same command to resume: "
                          f"`{command}`.")


def _is_done(journal: Journal, item: Item, out: Path, *, copy: bool, skip_bad: bool, unknown: str) -> bool:
    """Finished in an earlier run (outputs verified), or skipped as bad and unchanged since. A file
    whose unknown values were mapped to ignore is redone (and reported) under --unknown error."""
    rec = journal.records.get((item.split, item.stem))
    if rec is None:
        return False
    if "skipped" in rec:
        return skip_bad and rec["src"] == file_signature(item.label) + file_signature(item.image)
    if rec["unknown"] and unknown == UnknownPolicy.error.value:
        return False
    return record_is_current(rec, item, out, copy)


def run_jobs(job: Job, todo: list[Item], total: int, journal: Journal, *, workers: int, skip_bad: bool,
             quiet: bool, label: str, resume_hint: str) -> RunOutcome:
    """Convert `todo` in parallel, journaling each finished item; stop early on bad input."""
    outcome = RunOutcome()
    journal.open_for_append()
    try:
        with WorkerPool(workers, _init_worker, (job,)) as pool, progress_bar(quiet) as bar:
            task = bar.add_task(label, total=total, completed=total - len(todo))
            since_failure = -1  # items seen since the first failure (-1: none yet)
            for rec in pool.imap_unordered(_convert_in_worker, todo):
                bar.advance(task)
                if "bad" in rec and skip_bad:
                    journal.append({"split": rec["split"], "stem": rec["stem"], "src": rec["src"], "skipped": rec["bad"]})
                elif "bad" in rec:
                    outcome.bad.append(BadFile(rec["bad"]["file"], rec["bad"]["reason"]))
                elif "fine" not in rec:  # raw values the hierarchy does not know, policy "error"
                    outcome.unknown.append((rec["file"], rec["unknown"]))
                else:
                    journal.append(rec)
                    outcome.done += 1
                failures = len(outcome.bad) + len(outcome.unknown)
                since_failure += since_failure >= 0 or failures > 0
                if failures >= MAX_REPORTED_FILES or since_failure >= GRACE_ITEMS:
                    pool.stop()  # enough to report: let the files in flight finish, start no more
    except KeyboardInterrupt:
        raise UserError(f"interrupted after {total - len(todo) + outcome.done} of {total} files (the finished ones "
                        "are kept)", hint=f"Rerun the same command to resume: `{resume_hint}`.") from None
    except OSError as e:  # writing an output failed (disk full, permissions); unreadable inputs are BadFile
        with contextlib.suppress(OSError):
            journal.close()  # may fail the same way: records it cannot write are redone by the rerun
        done = total - len(todo) + outcome.done
        raise write_error(e, job.out, resume_hint, done) from None
    finally:
        journal.close()
    return outcome


def build_manifest(source: Source, raw: Path, h: Hierarchy, options: dict[str, Any], found: Discovery,
                   journal: Journal) -> dict[str, Any]:
    """Totals over every journaled item that RAW still holds (also those of earlier runs)."""
    fine_names, coarse_names = h.names(h.fine_level), h.names(h.coarse_level)
    discovered = {(it.split, it.stem) for items in found.items.values() for it in items}
    splits: dict[str, Any] = {}
    for split in sorted(found.items, key=_split_order):
        fine = np.zeros(len(fine_names), np.int64)
        coarse = np.zeros(len(coarse_names), np.int64)
        ignore, images = 0, 0
        unknown: dict[str, int] = {}
        skipped = [o.as_dict() for o in found.orphans if o.split == split]
        for (s, stem), rec in sorted(journal.records.items()):
            if s != split or (s, stem) not in discovered:
                continue
            if "skipped" in rec:
                skipped.append(rec["skipped"])
                continue
            images += 1
            add_counts(fine, rec["pixels"]["fine"], journal.path, stem)
            add_counts(coarse, rec["pixels"]["coarse"], journal.path, stem)
            ignore += rec["pixels"]["ignore"]
            for k, v in rec["unknown"].items():
                unknown[k] = unknown.get(k, 0) + v
        splits[split] = {
            "images": images,
            "pixels": {"fine": dict(zip(fine_names, fine.tolist())), "coarse": dict(zip(coarse_names, coarse.tolist())),
                       "ignore": ignore},
            "unknown_values": dict(sorted(unknown.items(), key=lambda kv: _value_order(kv[0]))),
            "skipped": sorted(skipped, key=lambda x: x["file"]),
        }
    return manifest_dict(source=source.name, raw_root=str(raw.resolve()), hierarchy=h, options=options,
                         splits=splits, missing_splits=found.missing_splits)


def add_counts(total: np.ndarray, counts: dict[str, int], journal: Path, stem: str) -> None:
    """total[id] += pixels for a record's {id: pixels}; ids beyond the hierarchy mean an edited journal."""
    for k, v in counts.items():
        if int(k) >= len(total):
            raise UserError(f"{journal}: the record of {stem!r} counts class id {k}, but the hierarchy has "
                            f"{len(total)} classes at that level (the journal was edited)",
                            hint="Rerun with --overwrite to prepare the dataset again.")
        total[int(k)] += v


def manifest_dict(*, source: str, raw_root: str | None, hierarchy: Hierarchy, options: dict[str, Any],
                  splits: dict[str, Any], missing_splits: list[str]) -> dict[str, Any]:
    """The manifest.json layout (README "Preparing data"), shared by the converters and the synthetic set."""
    return {
        "format": MANIFEST_FORMAT,
        "hiposeg_version": __version__,
        "source": source,
        "raw_root": raw_root,
        "hierarchy": {"name": hierarchy.name, "sha256": hierarchy.sha256},
        "levels": {"fine": hierarchy.fine_level, "coarse": hierarchy.coarse_level},
        "ignore_index": hierarchy.ignore_index,
        "options": options,
        "splits": splits,
        "missing_splits": missing_splits,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _split_order(split: str) -> tuple[int, str]:
    order = {"train": 0, "val": 1, "test": 2}
    return order.get(split, 3), split


def _value_order(v: str) -> tuple[int, Any]:
    return (0, int(v)) if v.isdigit() else (1, v)


# ==========================================================================================
# Messages for bad input.
# ==========================================================================================


def _bad_files_error(bad: list[BadFile]) -> UserError:
    bad = sorted(bad, key=lambda b: b.file)
    lines = [f"  {b.file}: {b.reason}" for b in bad[:MAX_REPORTED_FILES]]
    more = f"\n  ... and {len(bad) - MAX_REPORTED_FILES} more" if len(bad) > MAX_REPORTED_FILES else ""
    n = len(bad)
    return UserError(f"{n} input file{'s' if n > 1 else ''} cannot be prepared:\n" + "\n".join(lines) + more,
                     hint="Fix or replace those files and rerun (finished files are kept), or add --skip-bad to "
                          "leave them out (they are listed in manifest.json).")


def _unknown_values_error(found: list[tuple[str, dict[str, int]]], h: Hierarchy) -> UserError:
    found = sorted(found)
    values: dict[str, int] = {}
    for _, u in found:
        for k, v in u.items():
            values[k] = values.get(k, 0) + v
    shown = ", ".join(f"{k} ({v} px)" for k, v in sorted(values.items(), key=lambda kv: _value_order(kv[0]))[:20])
    files = "\n".join(f"  {f}: {', '.join(sorted(u, key=_value_order)[:10])}" for f, u in found[:MAX_REPORTED_FILES])
    more = f"\n  ... and {len(found) - MAX_REPORTED_FILES} more files" if len(found) > MAX_REPORTED_FILES else ""
    return UserError(f"label values that hierarchy {h.name!r} does not know: {shown}\nfirst files:\n{files}{more}",
                     hint="Check that RAW is the release this hierarchy describes (or pass the matching --hierarchy "
                          "FILE), or add --unknown ignore to map these values to ignore (they are counted in "
                          "manifest.json).")


# ==========================================================================================
# Summary for the terminal.
# ==========================================================================================


def print_summary(manifest: dict[str, Any], out: Path, console: Any) -> None:
    """The table of splits and the notes. Names from files (paths, splits, file names) are printed as
    text, never as Rich markup: a `[/]` in a name must not break or restyle the output."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"prepared {manifest['source']} -> {out}"), title_justify="left")
    for col in ("split", "images", "skipped", "ignore px", "unknown px", "classes present (fine)"):
        table.add_column(col, justify="left" if col in ("split",) else "right")
    for split, s in manifest["splits"].items():
        px = s["pixels"]
        total = sum(px["fine"].values()) + px["ignore"]
        ign = f"{100 * px['ignore'] / total:.1f}%" if total else "-"
        present = sum(1 for v in px["fine"].values() if v)
        table.add_row(escape(split), str(s["images"]), str(len(s["skipped"])), ign,
                      str(sum(s["unknown_values"].values())), f"{present}/{len(px['fine'])}")
    console.print(table)
    run = manifest.get("_run", {})
    for note in run.get("notes", []):
        console.print(f"[dim]{escape(note)}[/dim]")
    if "converted" in run:
        console.print(f"converted {run['converted']} file(s), {run['reused']} already done (resumed)")
    if manifest["missing_splits"]:
        console.print(f"[yellow]missing splits[/yellow] (not in RAW): {escape(', '.join(manifest['missing_splits']))}")
    skipped = [x for s in manifest["splits"].values() for x in s["skipped"]]
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} bad file(s)[/yellow] (listed in manifest.json):")
        for x in skipped[:10]:
            console.print(escape(f"  {x['file']}: {x['reason']}"))
    unknown = {k for s in manifest["splits"].values() for k in s["unknown_values"]}
    if unknown:
        shown = ", ".join(sorted(unknown, key=_value_order))
        console.print(f"[yellow]unknown raw values mapped to ignore[/yellow]: {escape(shown)}")
    levels = escape(f"{{{','.join(manifest['splits'])}}}/{{images,fine,coarse}}")
    console.print(f"dataset ready: [bold]{escape(str(out))}[/bold] (manifest.json, hierarchy.json, {levels})")
