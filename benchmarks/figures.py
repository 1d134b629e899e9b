"""Regenerate the README's pictures (benchmarks/figures/*.png) from the built-in synthetic set.

Trains the quickstart recipe twice (cross-entropy only, then every HiPoSeg term), runs one
`hiposeg plot` of the HiPoSeg run against the CE run, and copies the PNGs here at a reduced size
(at most MAX_WIDTH pixels wide, 128-colour palette PNGs), so the repository stays small. The whole
report (report.html, numbers.json, full-size PNG and SVG) stays in the work folder.

    python benchmarks/figures.py                       # the committed pictures: quickstart recipe, 400 iterations
    python benchmarks/figures.py --iters 150 --crop 64x64 --batch-size 4   # a quick look (a few minutes)

On a machine shared with other work, run it with OMP_NUM_THREADS=1 (BENCHMARKS.md, section 8).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from hiposeg.atomic import atomic_write_bytes

HERE = Path(__file__).resolve().parent
FIGURES = ("curves", "iou-fine", "levels", "featuremap", "geometry", "confusion-fine", "gallery", "ablation")
MAX_WIDTH = 820


def hiposeg(args: list[str], cwd: Path) -> float:
    """Run `python -m hiposeg ARGS` in `cwd`; its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hiposeg", *args], cwd=cwd, check=True)
    return time.perf_counter() - t0


def small_png(source: Path, max_width: int = MAX_WIDTH) -> bytes:
    """The picture scaled down to `max_width` (if wider) and stored with a 128-colour palette."""
    image = Image.open(source).convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=400, help="Training iterations of each run (quickstart: 400).")
    parser.add_argument("--crop", help="Training crop HxW (default: the synthetic recipe's).")
    parser.add_argument("--batch-size", type=int, help="Batch size (default: the synthetic recipe's).")
    parser.add_argument("--work", type=Path, default=Path("figures-work"), help="Runs and the full report go here.")
    parser.add_argument("--out", type=Path, default=HERE / "figures", help="Where the small PNGs go.")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = ["--iters", str(args.iters), *(["--crop", args.crop] if args.crop else []),
              *(["--batch-size", str(args.batch_size)] if args.batch_size else []), "--quiet"]
    for name, losses in (("ce", "ce"), ("hiposeg", "ce,fh,hh,fl,ll,align")):
        if not (work / "runs" / name / "report.json").is_file():
            seconds = hiposeg(["train", "--out", f"runs/{name}", "--losses", losses, *recipe], work)
            print(f"train {name}: {seconds:.0f} s")
    seconds = hiposeg(["plot", "runs/hiposeg", "--baseline", "runs/ce", "--out", "plots", "--overwrite"], work)
    print(f"plot: {seconds:.1f} s -> {work / 'plots'}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        data = small_png(work / "plots" / f"{name}.png")
        atomic_write_bytes(args.out / f"{name}.png", data)
        print(f"{args.out / name}.png: {len(data) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
