"""Reading input files: PNG/JPEG decoding and checks, label maps, PNG encoding.

Why a module of its own: `prepare`, the training loader (`dataset.py`), the synthetic set and
`predict` all read or write these files and must agree on what a label map is (palette PNGs are
read as their indices, grey+alpha only when opaque) and on what a damaged file is (truncated PNG,
JPEG with corrupt compressed data, a FIFO or device where a file is expected), and on how large an
image may be (`max_pixels`: checked from the header before any decoding). Problems a person can act
on are raised as `BadFile` naming the file; nothing here writes anything.
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

from hiposeg.data.headers import FORMATS, JPEG_SOI, PNG_SIGNATURE, JpegFrame, image_format, image_size, jpeg_frame
from hiposeg.errors import UserError

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
    check_pixels(path, header.height, header.width)
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


# ==========================================================================================
# The pixel limit: every image and label is sized from its header (`headers.image_size`) and
# compared with it before a pixel is decoded (a small file can claim gigapixels).
# ==========================================================================================

MAX_PIXELS_VAR = "HIPOSEG_MAX_PIXELS"
# 2^28 = 268,435,456 px (16384 x 16384): 2.5x the largest photos we know people segment (12000 x 9000,
# 108 MP), 13x Mapillary's largest images (~5000 x 4000); such a label map decodes to 256 MB (512 MB
# at 16 bits). A 20000 x 20000 image (400 MP, 4.8 GB as predict's float input) is refused.
DEFAULT_MAX_PIXELS = 1 << 28
OPENCV_MAX_PIXELS = 1 << 30  # OpenCV's own decoder limit (CV_IO_MAX_IMAGE_PIXELS): no use going above


def max_pixels() -> int:
    """The pixel limit: $HIPOSEG_MAX_PIXELS, else DEFAULT_MAX_PIXELS; a UserError if the variable is
    not a whole number from 1 to OPENCV_MAX_PIXELS."""
    text = os.environ.get(MAX_PIXELS_VAR, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 0 < limit <= OPENCV_MAX_PIXELS:
        raise UserError(f"{MAX_PIXELS_VAR}={text[:40]!r} is not a pixel count from 1 to {OPENCV_MAX_PIXELS:,} "
                        "(OpenCV decodes no larger image)",
                        hint=f"Unset it for the default limit of {DEFAULT_MAX_PIXELS:,} pixels, or give a whole "
                             "number, e.g. 400000000.")
    return limit


def check_pixels(path: Path, height: int, width: int) -> None:
    """BadFile if the header's `height` x `width` exceeds the pixel limit (see `max_pixels`)."""
    limit, pixels = max_pixels(), height * width
    if pixels <= limit:
        return
    fix = (f"if it is a real image, raise the limit: {MAX_PIXELS_VAR}={pixels}" if pixels <= OPENCV_MAX_PIXELS else
           f"OpenCV decodes no image above {OPENCV_MAX_PIXELS:,} px: split or shrink it")
    raise BadFile(path, f"is {width}x{height} pixels ({pixels:,} px) by its header, above hiposeg's limit of {limit:,} "
                        f"px (a damaged file or a decompression bomb looks like this); {fix}")


def image_header(path: Path, f: Any) -> tuple[int, int]:
    """(height, width) of the image file `f` (open at `path`) from its header, within the pixel limit."""
    hw = image_size(f)
    if hw is None:
        kind = image_format(f.read(32))
        f.seek(0)
        raise BadFile(path, f"truncated or corrupt {kind} image (its header is cut short or damaged)" if kind
                      else f"not an image hiposeg reads: it is no {FORMATS} file")
    check_pixels(path, *hw)
    return hw


def decode_image(path: Path, flags: int) -> np.ndarray:
    """`cv2.imdecode` of an image file with `flags`, after checking that it is a regular file whose
    header size is within the pixel limit; BadFile naming the file otherwise."""
    try:
        with open_regular(path) as f:
            image_header(path, f)
            data = f.read()
    except OSError as e:
        raise unreadable(path, e) from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise BadFile(path, "corrupt or truncated image: OpenCV cannot decode it")
    return img


def probe_image(path: Path) -> tuple[int, int]:
    """(height, width) of an image from its header, within the pixel limit; checks that the file is
    complete (PNG IEND / JPEG EOI) and that a JPEG's compressed data is undamaged (`check_jpeg_file`).
    Other formats are decoded by cv2 (after the size check)."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BadFile(path, "empty file (0 bytes): re-extract or re-download it")
            hw = image_header(path, f)
            head = f.read(32)
            if head.startswith(PNG_SIGNATURE):
                f.seek(max(0, size - 64))
                if not png_is_complete(f.read()):
                    raise BadFile(path, "truncated or corrupt PNG image (no IEND chunk at the end)")
            elif head.startswith(JPEG_SOI):
                check_jpeg_file(path, f, size)
            elif cv2.imdecode(np.frombuffer(head + f.read(), np.uint8), cv2.IMREAD_UNCHANGED) is None:
                raise BadFile(path, "unreadable image: OpenCV cannot decode it")
            return hw
    except OSError as e:
        raise unreadable(path, e) from None


# libjpeg's warnings for damaged compressed data (jerror.h JWRN_JPEG_EOF, JWRN_*_CORRUPT...). Other
# warnings (odd but valid files) and unsupported colour conversions (CMYK) go to OpenCV instead.
JPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file")
# A few padding bytes before the end marker are a harmless encoder quirk (COCO has such files); a
# decoder that stops hundreds of bytes early has read damaged data as codes.
JPEG_TRAILING_PADDING = re.compile(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9")
MAX_PADDING_BYTES = 64


# libjpeg decodes a progressive JPEG (or one whose first scan leaves out components) through an array
# of every DCT coefficient of the image, about 3 bytes a pixel at 4:2:0 and 6 at 4:4:4, even at 1/8
# scale: the strict check of a 1.5 MB progressive 20000 x 20000 file took 820 MB. Above this size such
# a file is checked for its structure only (headers, end marker); OpenCV, which decodes it for training
# and predict, repairs damaged data in it silently. 256 MB admits every progressive photo up to about
# 89 megapixels at 4:2:0 (every Mapillary image); prepare runs one check per worker process.
MAX_STRICT_CHECK_BYTES = 256 << 20


def check_jpeg_file(path: Path, f: Any, size: int) -> None:
    """A JPEG file (`f`, `size` bytes) must end with its end-of-image marker, and its compressed data
    must be undamaged (`check_jpeg_data`) unless decoding it needs more than MAX_STRICT_CHECK_BYTES."""
    f.seek(max(0, size - 4096))
    if b"\xff\xd9" not in f.read():
        raise BadFile(path, "truncated or corrupt JPEG image (no end-of-image marker)")
    f.seek(0)
    frame = jpeg_frame(f)
    f.seek(0)
    if frame is None:
        raise BadFile(path, "truncated or corrupt JPEG image (its headers end before the image data)")
    if strict_check_fits(frame):
        check_jpeg_data(path, f.read())


def strict_check_fits(frame: JpegFrame) -> bool:
    """Whether entropy-decoding this JPEG at 1/8 scale stays within MAX_STRICT_CHECK_BYTES."""
    return not frame.buffers_coefficients or frame.coefficient_bytes <= MAX_STRICT_CHECK_BYTES


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
