"""Shared test helpers: running the CLI (`cli`, `fails_with`, `squash`), the real-format sample files
(`real_sample`, located by HIPOSEG_REAL_FIXTURES), the suite's tiny dataset, configuration, run and
exported models (`tiny_data`, `tiny_config`, `tiny_run`, `exported_models`), and PNG writers for what cv2
cannot write (palette and 1/2/4-bit greyscale PNGs, a header claiming any size), written by hand with
zlib + struct. Test modules import the plain functions: `from conftest import fails_with, squash`."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

# The tests run tiny models on tiny tensors, where torch's thread pool costs more than it gains
# (on a busy 2-core machine a 64x64 training step took ~4 s with 2 threads and 0.06 s with 1).
# Set before torch is imported anywhere; subprocesses (DDP workers, killed-and-resumed runs) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test touches the network: pretrained weights come only from caches the tests fill
# (tests/test_pretrained_weights.py). Set before huggingface_hub reads its environment at import.
os.environ["HIPOSEG_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

_RUNNER = CliRunner()
MODEL_SUFFIX = {"hiposeg": ".pt", "torch-export": ".pt2", "onnx": ".onnx"}


def squash(text: str) -> str:
    """Rich wraps long lines (even inside paths): compare with all whitespace removed."""
    return "".join(text.split())


@pytest.fixture(scope="session")
def cli() -> CliRunner:
    """Runs `hiposeg` commands in-process: `cli.invoke(app, [...])`."""
    return _RUNNER


def fails_with(args: list, *needles: str | Path) -> str:
    """`hiposeg ARGS` exits 2 with one clear message holding every needle (whitespace ignored): no
    traceback, also none relayed from a DataLoader worker. Returns the output."""
    from hiposeg.cli import app

    r = _RUNNER.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    for bad in ("Traceback", "DataLoader worker", "Caught UserError"):
        assert bad not in r.output, r.output
    for needle in needles:
        assert squash(str(needle)) in squash(r.output), (needle, r.output)
    return r.output


# The real-format sample files of public datasets (README "Real-format sample files"): the folder named
# by HIPOSEG_REAL_FIXTURES, else ../shared/fixtures/real beside the checkout. Read here once; every test
# takes them through `real_sample`, which skips the test (naming the setting) when they are absent.
REAL_FIXTURES_VARIABLE = "HIPOSEG_REAL_FIXTURES"
REAL_FIXTURES = Path(os.environ.get(REAL_FIXTURES_VARIABLE)
                     or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real")


def real_sample(relative: str) -> Path:
    """A file or folder of the real-format samples; the calling test is skipped when it is absent."""
    path = REAL_FIXTURES / relative
    if not path.exists():
        pytest.skip(f"real-format sample {path} not found: set {REAL_FIXTURES_VARIABLE} to the samples' folder "
                    "(README, \"Real-format sample files\")")
    return path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _packed_rows(values: np.ndarray, bit_depth: int) -> bytes:
    """PNG scanlines (filter 0) of one sample per pixel; 1/2/4-bit samples packed most significant first."""
    h, w = values.shape
    if bit_depth == 8:
        rows = values.astype(np.uint8)
    else:
        per = 8 // bit_depth
        padded = np.zeros((h, -(-w // per) * per), np.uint8)
        padded[:, :w] = values
        shifts = (8 - bit_depth * (np.arange(per) + 1)).astype(np.uint8)
        rows = (padded.reshape(h, -1, per) << shifts).sum(axis=2).astype(np.uint8)
    return b"".join(b"\x00" + rows[y].tobytes() for y in range(h))


def _png(width: int, height: int, bit_depth: int, color_type: int, *chunks: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(chunks) + _chunk(b"IEND", b"")


def palette_png_bytes(indices: np.ndarray, palette: np.ndarray, bit_depth: int = 8) -> bytes:
    """A colour-type-3 PNG: `indices` (H, W) uint8 into `palette` (N, 3) RGB, filter 0 rows."""
    h, w = indices.shape
    return _png(w, h, bit_depth, 3, _chunk(b"PLTE", palette.astype(np.uint8).tobytes()),
                _chunk(b"IDAT", zlib.compress(_packed_rows(indices, bit_depth))))


def grey_png_bytes(values: np.ndarray, bit_depth: int) -> bytes:
    """A colour-type-0 (greyscale) PNG of 1, 2, 4 or 8 bits holding `values` (H, W) as stored."""
    h, w = values.shape
    return _png(w, h, bit_depth, 0, _chunk(b"IDAT", zlib.compress(_packed_rows(values, bit_depth))))


def png_header_only(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG whose header claims `width` x `height` with an empty image stream (a few dozen bytes):
    a reader that checks sizes from the header refuses it before decoding anything."""
    return _png(width, height, bit_depth, color_type, _chunk(b"IDAT", b""))


def tiny_config(data: Path, out: Path, **sections: dict):
    """The suite's tiny training run, in seconds on a CPU: resnet18 OS16 at 64x64, embeddings of 32,
    batch 2, 8 iterations (deterministic, a checkpoint every 4, a log line every 2), whole-image
    evaluation. `sections` are laid over it, e.g. `tiny_config(data, out, run={"amp": "bf16"})`."""
    from hiposeg.config import build_config, deep_update

    base = {"data": {"dataset": "custom", "root": str(data), "crop": (64, 64), "workers": 0, "scale_range": (0.75, 1.25)},
            "model": {"backbone": "resnet18", "output_stride": 16, "embed_dim": 32},
            "optim": {"iters": 8, "batch_size": 2},
            "run": {"out": str(out), "device": "cpu", "deterministic": True, "ckpt_every": 4, "log_every": 2,
                    "quiet": True, "eval_mode": "whole"}}
    return build_config(deep_update(base, sections))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared synthetic set of 12 + 4 images at 64x64 for engine and ablate runs (seconds each)."""
    from hiposeg.data.synthetic import generate

    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate(root, train=12, val=4, size=64, seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run): 2 iterations with every term active from step 0 and the auxiliary head, so the
    checkpoint holds a projection head, an auxiliary head and a filled prototype memory that export
    must leave out (export and predict tests)."""
    from hiposeg.data.synthetic import generate
    from hiposeg.engine import fit

    base = tmp_path_factory.mktemp("export")
    data = base / "synthetic"
    generate(data, train=8, val=2, size=64, seed=0, workers=1)
    fit(tiny_config(data, base / "run", loss={"schedule": "joint"}, model={"aux_head": True}, optim={"iters": 2}))
    return data, base / "run"


@pytest.fixture(scope="session")
def exported_models(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """The tiny run exported once through the CLI in each available format (each checked there
    against the trained segmenter): format name -> file."""
    import importlib.util

    from hiposeg.cli import app

    _, run = tiny_run
    out = tmp_path_factory.mktemp("models")
    has_onnx = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
    files = {}
    for fmt in ["hiposeg", "torch-export"] + (["onnx"] if has_onnx else []):
        path = out / f"model{MODEL_SUFFIX[fmt]}"
        r = _RUNNER.invoke(app, ["export", str(run), "--out", str(path), "--format", fmt])
        assert r.exit_code == 0, r.output
        files[fmt] = path
    return files


@pytest.fixture(scope="session")
def write_palette_png():
    """`write(path, indices, palette, bit_depth=8)` writes a real palette PNG."""

    def write(path: Path, indices: np.ndarray, palette: np.ndarray, bit_depth: int = 8) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(palette_png_bytes(indices, palette, bit_depth))
        return path

    return write
