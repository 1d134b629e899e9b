"""Images too large to decode safely: the pixel limit read from each format's header, before any
decoding, in `prepare` (images and labels), the prepared-dataset reader and `predict`; the memory
bound of the strict JPEG check."""

from __future__ import annotations

import io
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import fails_with, png_header_only, squash
from hiposeg.cli import app
from hiposeg.data import codecs
from hiposeg.data.codecs import BadFile, probe_image
from hiposeg.data.headers import JpegFrame, image_size, jpeg_frame
from hiposeg.errors import UserError

NOISE = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)


def cv2_bytes(ext: str, image: np.ndarray = NOISE, params: tuple[int, ...] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def pil_bytes(fmt: str, mode: str = "RGB", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(NOISE).convert(mode).save(out, fmt, **options)
    return out.getvalue()


HEADER_CASES = {
    "png": lambda: cv2_bytes(".png"),
    "jpeg baseline": lambda: cv2_bytes(".jpg"),
    "jpeg progressive": lambda: cv2_bytes(".jpg", params=(cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
    "jpeg grey": lambda: cv2_bytes(".jpg", NOISE[..., 0]),
    "bmp": lambda: cv2_bytes(".bmp"),
    "bmp (Pillow)": lambda: pil_bytes("BMP"),
    "tiff": lambda: cv2_bytes(".tiff"),
    "tiff (Pillow, compressed)": lambda: pil_bytes("TIFF", compression="tiff_deflate"),
    "bigtiff (Pillow)": lambda: pil_bytes("TIFF", big_tiff=True),
    "webp lossy": lambda: cv2_bytes(".webp", params=(cv2.IMWRITE_WEBP_QUALITY, 80)),
    "webp lossless": lambda: cv2_bytes(".webp", params=(cv2.IMWRITE_WEBP_QUALITY, 101)),
    "webp extended (alpha)": lambda: pil_bytes("WEBP", mode="RGBA", quality=80),
    "ppm": lambda: cv2_bytes(".ppm"),
    "pgm": lambda: cv2_bytes(".pgm", NOISE[..., 0]),
    "pbm": lambda: cv2_bytes(".pbm", NOISE[..., 0]),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_image_sizes_are_read_from_the_headers_of_every_format(case):
    data = HEADER_CASES[case]()
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None, case
    assert image_size(io.BytesIO(data)) == decoded.shape[:2] == (37, 53)


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_a_header_cut_short_or_garbled_is_no_size_never_an_exception(case):
    """Headers come from untrusted files: every prefix, and the signature followed by noise, gives
    the true size or None (the caller then names the file), never an exception from the parser."""
    data = HEADER_CASES[case]()
    for cut in range(len(data)):
        assert image_size(io.BytesIO(data[:cut])) in (None, (37, 53)), cut
    rng = np.random.default_rng(2)
    for _ in range(200):
        noisy = data[:4] + rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
        size = image_size(io.BytesIO(noisy))
        assert size is None or (len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size))


def test_a_big_endian_tiff_and_a_top_down_bmp_are_sized_too():
    """Writers differ: Motorola byte order (MM: a minimal TIFF made by hand, as cv2 and Pillow write
    Intel order) and BMP rows stored top-down (a negative height)."""
    ifd = struct.pack(">H", 2) + struct.pack(">HHHHI", 256, 3, 0, 1, 53 << 16) + struct.pack(">HHII", 257, 4, 1, 37)
    assert image_size(io.BytesIO(b"MM\x00*" + struct.pack(">I", 8) + ifd + bytes(4))) == (37, 53)
    bmp = bytearray(cv2_bytes(".bmp"))
    bmp[22:26] = struct.pack("<i", -37)
    assert image_size(io.BytesIO(bytes(bmp))) == (37, 53)


def jpeg_claiming(height: int, width: int) -> bytes:
    """A real small progressive JPEG whose frame header (SOF) is patched to claim `height` x `width`."""
    data = bytearray(cv2_bytes(".jpg", params=(cv2.IMWRITE_JPEG_PROGRESSIVE, 1)))
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(height: int, width: int) -> bytes:
    """A 54-byte BMP header with no pixel data behind it."""
    return (b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0,
                                                                       0, 0, 0, 0))


def folder_with_bombs(raw: Path) -> dict[str, Path]:
    """RAW/train: a label and three images claiming 400 megapixels (a few dozen bytes each), one
    good pair; RAW/val: one good pair. Returns the bombs by kind."""
    for split, stems in (("train", ["ok", "label", "png", "jpeg", "bmp"]), ("val", ["v"])):
        (raw / split / "images").mkdir(parents=True)
        (raw / split / "masks").mkdir(parents=True)
        for stem in stems:
            cv2.imwrite(str(raw / split / "images" / f"{stem}.png"), np.zeros((8, 8, 3), np.uint8))
            cv2.imwrite(str(raw / split / "masks" / f"{stem}.png"), np.full((8, 8), 1, np.uint8))
    images = raw / "train" / "images"
    bombs = {"label": raw / "train/masks/label.png", "png": images / "png.png", "jpeg": images / "jpeg.jpg",
             "bmp": images / "bmp.bmp"}
    bombs["label"].write_bytes(png_header_only(20000, 20000, 8, 0))
    bombs["png"].write_bytes(png_header_only(20000, 20000))
    for kind in ("jpeg", "bmp"):
        (images / f"{kind}.png").unlink()
    bombs["jpeg"].write_bytes(jpeg_claiming(20000, 20000))
    bombs["bmp"].write_bytes(bmp_claiming(20000, 20000))
    return bombs


LIMIT_WORDS = ["20000x20000 pixels (400,000,000 px)", "above hiposeg's limit of 268,435,456 px",
               "HIPOSEG_MAX_PIXELS=400000000"]


def test_prepare_refuses_images_and_labels_above_the_pixel_limit_from_their_headers(tmp_path):
    """The files hold no pixel data at all: each is refused by its header's size, before anything is
    decoded (a 1.5 MB label PNG claiming 30000 x 30000 used to end in an allocation traceback)."""
    from test_prepare_errors import two_colours

    bombs = folder_with_bombs(tmp_path / "raw")
    out = fails_with(["prepare", "folder", tmp_path / "raw", "--hierarchy", two_colours(tmp_path), "--out",
                      tmp_path / "o", "--workers", "1", "-q"], "4 input files cannot be prepared", *bombs.values(),
                     *LIMIT_WORDS, "--skip-bad")
    assert squash(out).count("400,000,000px") == 4, out


def test_the_pixel_limit_can_be_raised_and_a_bad_value_is_named(tmp_path, monkeypatch, cli):
    from test_prepare_errors import folder_raw, two_colours

    folder_raw(tmp_path / "raw", {"train": ["t0"], "val": ["v0"]})  # 4x4 pictures and masks

    def args(out: str) -> list:
        return ["prepare", "folder", tmp_path / "raw", "--hierarchy", two_colours(tmp_path), "--out", tmp_path / out,
                "--workers", "1", "-q"]

    monkeypatch.setenv("HIPOSEG_MAX_PIXELS", "15")
    fails_with(args("o"), "4x4 pixels (16 px)", "above hiposeg's limit of 15 px", "HIPOSEG_MAX_PIXELS=16")
    monkeypatch.setenv("HIPOSEG_MAX_PIXELS", "16")
    r = cli.invoke(app, [str(a) for a in args("o")])
    assert r.exit_code == 0, r.output
    beyond_opencv = tmp_path / "beyond.png"  # OpenCV's own limit ended in a cv2.error traceback
    beyond_opencv.write_bytes(png_header_only(40000, 40000))
    with pytest.raises(BadFile, match="1,600,000,000 px.*OpenCV decodes no image above 1,073,741,824 px"):
        probe_image(beyond_opencv)
    for bad in ("lots", "0", "-5", str(2**30 + 1)):
        monkeypatch.setenv("HIPOSEG_MAX_PIXELS", bad)
        fails_with(args("o2"), f"HIPOSEG_MAX_PIXELS='{bad}' is not a pixel count", "1,073,741,824", "e.g. 400000000")
        assert not (tmp_path / "o2").exists()


def test_predict_refuses_an_image_above_the_pixel_limit_before_any_output(exported_models, tmp_path):
    """A 20000 x 20000 PNG of 1.1 MB made predict allocate 4.8 GB for its input tensor alone."""
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "a.png"), np.zeros((32, 32, 3), np.uint8))
    (photos / "huge.png").write_bytes(png_header_only(20000, 20000))
    out = tmp_path / "out"
    fails_with(["predict", exported_models["hiposeg"], photos, "--out", out, "--device", "cpu", "--workers", "0"],
               f"cannot read image {photos / 'huge.png'}", *LIMIT_WORDS)
    assert not out.exists()


def test_the_dataset_reader_refuses_files_above_the_pixel_limit(tiny_data, tmp_path):
    """Training and evaluation read images and label maps of a prepared dataset: a file replaced by
    a bomb after `prepare` is named, not decoded."""
    from hiposeg.data.dataset import PreparedDataset

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    image = sorted((data / "val/images").iterdir())[0]
    label = sorted((data / "val/fine").iterdir())[1]
    image.write_bytes(png_header_only(20000, 20000))
    label.write_bytes(png_header_only(20000, 20000, 8, 0))
    ds = PreparedDataset(data, "val")
    with pytest.raises(UserError, match=f"cannot read image {image}: is 20000x20000 pixels") as e:
        ds.load(0)
    assert "HIPOSEG_MAX_PIXELS=400000000" in str(e.value)
    with pytest.raises(UserError, match=f"cannot read label map {label}: is 20000x20000 pixels"):
        ds.load(1)


# ---- the strict JPEG check: bounded memory -----------------------------------------------------


def damaged(jpeg: bytes) -> bytes:
    """Compressed data zeroed in the middle, headers and end marker intact: OpenCV decodes it silently."""
    body = bytearray(jpeg)
    body[len(body) // 3: 2 * len(body) // 3] = bytes(len(body) // 3)
    return bytes(body)


def test_the_strict_jpeg_check_is_skipped_only_where_it_would_buffer_too_much(tmp_path, monkeypatch):
    """Progressive JPEGs are decoded through a whole-image coefficient array (a 1.5 MB progressive
    20000 x 20000 file took 820 MB to check): above MAX_STRICT_CHECK_BYTES such a file gets the
    structural check only; a baseline JPEG streams, so it is always checked in full."""
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    progressive = tmp_path / "progressive.jpg"
    progressive.write_bytes(damaged(cv2_bytes(".jpg", noise, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))))
    baseline = tmp_path / "baseline.jpg"
    baseline.write_bytes(damaged(cv2_bytes(".jpg", noise)))
    with open(progressive, "rb") as f:
        frame = jpeg_frame(f)
    # 4:2:0: luma 8 x 8 blocks, each chroma plane 4 x 4, 128 bytes a block
    assert frame.progressive and frame.buffers_coefficients and frame.coefficient_bytes == (64 + 16 + 16) * 128
    for path in (progressive, baseline):
        with pytest.raises(BadFile, match="corrupt JPEG image"):
            probe_image(path)
    monkeypatch.setattr(codecs, "MAX_STRICT_CHECK_BYTES", frame.coefficient_bytes - 1)
    assert probe_image(progressive) == (64, 64)  # structure only: headers and end marker
    with pytest.raises(BadFile, match="corrupt JPEG image"):
        probe_image(baseline)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(progressive.read_bytes()[:-200])
    with pytest.raises(BadFile, match="no end-of-image marker"):
        probe_image(truncated)


def test_a_sequential_jpeg_with_separate_scans_per_component_also_buffers_coefficients():
    """libjpeg buffers the whole image whenever the first scan leaves out components (non-interleaved)."""
    frame = JpegFrame(height=16, width=16, progressive=False, sampling=((1, 1),) * 3, first_scan_components=1)
    assert frame.buffers_coefficients and frame.coefficient_bytes == 3 * 4 * 128
    assert not JpegFrame(16, 16, False, ((1, 1),) * 3, first_scan_components=3).buffers_coefficients
