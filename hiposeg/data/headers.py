"""Image sizes from file headers, read without decoding a pixel.

Why a module of its own: a file of a few kilobytes can claim 40000 x 40000 pixels (a decompression
or dimension bomb), and decoding it would allocate gigabytes before any check could run, so every
reader of images (`prepare`, the dataset loader, `predict`) first reads the size from the header
(`image_size`) and compares it with the pixel limit (`codecs.check_pixels`). The formats are those
hiposeg reads: PNG, JPEG, BMP, TIFF (classic and BigTIFF), WebP (lossy, lossless, extended) and
PNM (PBM/PGM/PPM). For a JPEG, `jpeg_frame` also tells how much memory libjpeg needs to decode it.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# SOF markers (ITU T.81 table B.1); the progressive ones buffer every DCT coefficient of the image.
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
JPEG_SOS = 0xDA
MAX_TIFF_ENTRIES = 4096  # a first directory lists a few dozen tags; its count is read from the file
COEFFICIENT_BYTES_PER_BLOCK = 64 * 2  # libjpeg keeps a whole-image coefficient array as 8x8 blocks of int16


@dataclass(frozen=True)
class JpegFrame:
    """A JPEG's frame header (SOF) and first scan header (SOS)."""

    height: int
    width: int
    progressive: bool
    sampling: tuple[tuple[int, int], ...]  # (horizontal, vertical) factors of each component
    first_scan_components: int

    @property
    def buffers_coefficients(self) -> bool:
        """libjpeg holds every coefficient of the image in memory for a progressive file or one
        whose first scan leaves out components (several scans); other files stream in a few rows."""
        return self.progressive or self.first_scan_components < len(self.sampling)

    @property
    def coefficient_bytes(self) -> int:
        """Size of that whole-image coefficient array (about 3 bytes per pixel for 4:2:0 colour)."""
        h_max = max(h for h, _ in self.sampling)
        v_max = max(v for _, v in self.sampling)
        blocks = sum(_ceil(self.width * h, h_max * 8) * _ceil(self.height * v, v_max * 8) for h, v in self.sampling)
        return blocks * COEFFICIENT_BYTES_PER_BLOCK


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def jpeg_frame(f: BinaryIO) -> JpegFrame | None:
    """The frame of the JPEG at the start of `f`, reading its marker segments up to the first scan
    (headers only); None if it is not a JPEG or its headers end early."""
    if f.read(2) != JPEG_SOI:
        return None
    frame = None
    while True:
        marker = _next_marker(f)
        if marker is None:
            return None
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            continue
        seg = f.read(2)
        if len(seg) < 2:
            return None
        (length,) = struct.unpack(">H", seg)
        body = f.read(max(0, length - 2))
        if len(body) < length - 2:
            return None
        if marker in JPEG_SOF and frame is None:
            frame = _sof(body, marker)
            if frame is None:
                return None
        elif marker == JPEG_SOS:
            return None if frame is None or not body else JpegFrame(*frame, first_scan_components=body[0])


def _next_marker(f: BinaryIO) -> int | None:
    """The code of the next marker (after 0xFF fill bytes), or None at the end of the file."""
    byte = f.read(1)
    while byte and byte != b"\xff":
        byte = f.read(1)
    while byte == b"\xff":
        byte = f.read(1)
    return byte[0] if byte else None


def _sof(body: bytes, marker: int) -> tuple[int, int, bool, tuple[tuple[int, int], ...]] | None:
    if len(body) < 6:
        return None
    height, width, count = struct.unpack(">HHB", body[1:6])
    comps = body[6:6 + 3 * count]
    if count == 0 or len(comps) < 3 * count:
        return None
    sampling = tuple((max(1, comps[3 * i + 1] >> 4), max(1, comps[3 * i + 1] & 15)) for i in range(count))
    return height, width, marker in JPEG_PROGRESSIVE_SOF, sampling


# ---- the other formats: (height, width) from the first bytes -----------------------------------


def _png(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return height, width


def _jpeg(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    frame = jpeg_frame(f)
    return None if frame is None else (frame.height, frame.width)


def _bmp(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    if len(head) < 26:
        return None
    (dib_size,) = struct.unpack("<I", head[14:18])
    if dib_size == 12:  # BITMAPCOREHEADER (OS/2)
        width, height = struct.unpack("<HH", head[18:22])
    else:
        width, height = struct.unpack("<ii", head[18:26])
    return abs(height), abs(width)  # a negative height means top-down rows


def _webp(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    if len(head) < 30 or head[8:12] != b"WEBP":
        return None
    kind = head[12:16]
    if kind == b"VP8X":  # extended: canvas size minus one, 24 bits each
        return int.from_bytes(head[27:30], "little") + 1, int.from_bytes(head[24:27], "little") + 1
    if kind == b"VP8L" and head[20] == 0x2F:  # lossless: 14 bits each, minus one
        bits = int.from_bytes(head[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack("<HH", head[26:30])
        return height & 0x3FFF, width & 0x3FFF
    return None


def _tiff(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first image file directory."""
    order = "<" if head[:2] == b"II" else ">"
    big = struct.unpack(order + "H", head[2:4])[0] == 43
    # classic: 4-byte IFD offset, 2-byte entry count, entries of tag, type, 4-byte count, 4-byte value;
    # BigTIFF: 8-byte offset, 8-byte entry count, entries with an 8-byte count and an 8-byte value
    offset_fmt, count_fmt, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
    value_at = 4 + (8 if big else 4)
    f.seek(8 if big else 4)
    raw = f.read(struct.calcsize(offset_fmt))
    if len(raw) < struct.calcsize(offset_fmt):
        return None
    offset, end = struct.unpack(order + offset_fmt, raw)[0], f.seek(0, 2)
    if offset >= end:
        return None
    f.seek(offset)
    raw = f.read(struct.calcsize(count_fmt))
    if len(raw) < struct.calcsize(count_fmt):
        return None
    entries = f.read(min(struct.unpack(order + count_fmt, raw)[0], MAX_TIFF_ENTRIES) * entry_size)
    size: dict[int, int] = {}
    for pos in range(0, len(entries) - entry_size + 1, entry_size):
        tag, kind = struct.unpack(order + "HH", entries[pos:pos + 4])
        value = entries[pos + value_at:pos + entry_size]  # inline for one SHORT, LONG or LONG8
        fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
        if tag in (256, 257) and fmt is not None and struct.calcsize(fmt) <= len(value):
            size[tag] = struct.unpack(order + fmt, value[:struct.calcsize(fmt)])[0]
    return (size[257], size[256]) if len(size) == 2 else None


_PNM_GAP = rb"(?:\s|#[^\n]*\n)+"  # whitespace, and comments from # to the end of the line
_PNM_HEADER = re.compile(rb"P[1-6]" + _PNM_GAP + rb"(\d+)" + _PNM_GAP + rb"(\d+)(?:\s|#)")


def _pnm(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    """P1..P6: the magic, the width and the height, each followed by whitespace or a comment."""
    match = _PNM_HEADER.match(f.read(2048))
    return None if match is None else (int(match.group(2)), int(match.group(1)))


READERS: tuple[tuple[str, tuple[bytes, ...], Callable[[BinaryIO, bytes], tuple[int, int] | None]], ...] = (
    ("PNG", (PNG_SIGNATURE,), _png), ("JPEG", (JPEG_SOI,), _jpeg), ("BMP", (b"BM",), _bmp),
    ("WebP", (b"RIFF",), _webp), ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), _tiff),
    ("PNM", tuple(b"P%d" % k for k in range(1, 7)), _pnm),
)
FORMATS = "PNG, JPEG, BMP, TIFF, WebP or PNM"


def image_format(head: bytes) -> str | None:
    """The name of the format whose signature `head` (a file's first bytes) starts with."""
    return next((name for name, magics, _ in READERS if head.startswith(magics)), None)


def image_size(f: BinaryIO) -> tuple[int, int] | None:
    """(height, width) from the header of the image file `f` (read from its start), or None if it is
    none of the formats above or its header is cut short. Leaves `f` at its start."""
    f.seek(0)
    head = f.read(32)
    f.seek(0)
    try:
        return next((reader(f, head) for _, magics, reader in READERS if head.startswith(magics)), None)
    finally:
        f.seek(0)
