"""Throughput of `hiposeg prepare` against the bare floor, on Cityscapes-sized label maps.

    python benchmarks/bench_prepare.py --images 20 [--workers 1,2] [--repeat 3]

Synthesises N frames in the real Cityscapes raw layout in a temp folder (1024x2048 8-bit labelIds
made of random polygons over ids 0..33, and their images), then times side by side:

* floor: the same work in a plain loop in one process, no machinery at all: cv2.imread the label,
  numpy LUT to fine and to coarse ids, cv2.imencode both, write both files;
* prepare: `hiposeg.data.prepare.prepare(Cityscapes(), ...)` with --workers W (discovery, worker
  pool, label checks, image probe + symlink, atomic writes with fsync, journal, manifest).

`ratio/worker` = prepare time x W / floor time: 1.00 means each worker runs as fast as the bare
loop (the goal is <= 1.25). Each figure is the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from hiposeg.data.cityscapes import Cityscapes
from hiposeg.data.prepare import prepare
from hiposeg.hierarchy import Hierarchy


def synthesise(raw: Path, n: int, h: int, w: int, seed: int = 0) -> list[Path]:
    """N frames in RAW/{leftImg8bit,gtFine}/val/CITY/; returns the label paths."""
    rng = np.random.default_rng(seed)
    labels = []
    image = np.full((h, w, 3), 100, np.uint8)
    for i in range(n):
        city = f"city{i % 4}"
        stem = f"{city}_{i:06d}_000019"
        lab = np.full((h, w), 7, np.uint8)
        for _ in range(120):  # a street-scene-like mosaic of polygons
            pts = rng.integers(0, [w, h], (int(rng.integers(3, 7)), 2)).astype(np.int32)
            cv2.fillPoly(lab, [pts], int(rng.integers(0, 34)))
        for sub, name, arr in (("gtFine", f"{stem}_gtFine_labelIds.png", lab),
                               ("leftImg8bit", f"{stem}_leftImg8bit.png", image)):
            d = raw / sub / "val" / city
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / name), arr)
        labels.append(raw / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
    return labels


def floor(labels: list[Path], out: Path, lut_fine: np.ndarray, lut_coarse: np.ndarray) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for p in labels:
        lab = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        for level, lut in (("fine", lut_fine), ("coarse", lut_coarse)):
            ok, buf = cv2.imencode(".png", lut[lab])
            with open(out / f"{p.stem}.{level}.png", "wb") as f:
                f.write(buf.tobytes())
    return time.perf_counter() - t


def run_prepare(raw: Path, out: Path, workers: int) -> float:
    t = time.perf_counter()
    prepare(Cityscapes(), raw, out, workers=workers, overwrite=True, quiet=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20, help="frames to synthesise (default 20)")
    ap.add_argument("--workers", default="1,2", help="comma list of --workers values (default 1,2)")
    ap.add_argument("--size", default="1024x2048", help="label size HxW (default 1024x2048, Cityscapes)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept (default 3)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, deleted after)")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    workers = [int(v) for v in args.workers.split(",")]

    hier = Hierarchy.load("cityscapes")
    lut = hier.raw_lut(unknown="ignore")[:256]
    lut_fine = lut.astype(np.uint8)
    lut_coarse = hier.raw_lut(hier.coarse_level, unknown="ignore")[:256].astype(np.uint8)

    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        t = time.perf_counter()
        labels = synthesise(base / "raw", args.images, h, w)
        print(f"synthesised {args.images} Cityscapes frames of {w}x{h} in {time.perf_counter() - t:.1f} s "
              f"({os.cpu_count()} CPUs visible)")
        floor(labels, base / "floor", lut_fine, lut_coarse)  # warm the page cache
        t_floor = min(floor(labels, base / "floor", lut_fine, lut_coarse) for _ in range(args.repeat))
        rows = []
        for wk in workers:
            run_prepare(base / "raw", base / f"out{wk}", wk)  # warm-up (pool start-up, caches)
            rows.append((wk, min(run_prepare(base / "raw", base / f"out{wk}", wk) for _ in range(args.repeat))))
        n = args.images
        print(f"\nfloor (1 process: imread -> numpy LUT x2 -> imencode x2 -> write): {t_floor:.3f} s, "
              f"{n / t_floor:.1f} img/s")
        print(f"{'workers':>7} {'prepare s':>10} {'img/s':>8} {'speed-up':>9} {'ratio/worker':>13}")
        t1 = rows[0][1]
        for wk, t_prep in rows:
            print(f"{wk:>7} {t_prep:>10.3f} {n / t_prep:>8.1f} {t1 / t_prep:>8.2f}x {t_prep * wk / t_floor:>12.2f}x")
        print("\nratio/worker = prepare time x workers / floor time (goal <= 1.25; on a shared machine with fewer "
              "free cores than workers it rises by the oversubscription)")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
