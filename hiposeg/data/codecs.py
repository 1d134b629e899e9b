"""Reading input files: PNG/JPEG decoding and checks, label maps, PNG encoding.

Why a module of its own: `prepare`, the training loader (`dataset.py`), the synthetic set and
`predict` all read or write these files and must agree on what a label map is (palette PNGs are
read as their indices, grey+alpha only when opaque) and on what a damaged file is (truncated PNG,
JPEG with corrupt compressed data, a FIFO or device where a file is expected). Problems a person
can act on are raised as `BadFile` naming the file; nothing here writes anything.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import simplejpeg

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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
        """One value per pixel: grayscale (1 to 16 bits) or palette indices."""
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
        data = _palette_as_grayscale(data)
    values = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if values is not None and header is not None and header.is_index_map and header.bit_depth < 8:
        values = stored_low_bit_values(values, header.bit_depth)
    return values


def stored_low_bit_values(values: np.ndarray, bit_depth: int) -> np.ndarray:
    """The stored 1/2/4-bit values of a grey (or relabelled palette) PNG. libpng widens them to 0..255
    by scaling (v * 255 / (2^d - 1): a 1-bit mask reads as 0/255), which would turn class 1 into the
    usual ignore value 255; a value of 2^d or more can only come from that scaling, so it is undone."""
    if values.max(initial=0) >= 1 << bit_depth:
        values = values // (255 // ((1 << bit_depth) - 1))
    return values


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


def unreadable(path: Path, e: OSError) -> BadFile:
    """The BadFile for an OSError while reading an input file."""
    if isinstance(e, FileNotFoundError):
        return BadFile(path, "file not found (removed while preparing?)")
    if e.errno == errno.ELOOP:
        return BadFile(path, "symlink loop: the link points (eventually) back to itself")
    return BadFile(path, f"cannot read: {e.strerror or e}")


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
