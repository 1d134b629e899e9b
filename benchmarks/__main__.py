"""Run every benchmark: `python -m benchmarks` (CPU sizes; its time on 2 CPU cores: BENCHMARKS.md) or
`python -m benchmarks --tiny` (the smallest sizes, a smoke run that every script still works).

Each benchmark is a standalone script with its own flags for larger sizes (see BENCHMARKS.md);
this runner only calls them one after another with their default, CPU-sized arguments, or with
the tiny ones.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# title, script, its arguments at the CPU sizes, its arguments at the tiny sizes
SUITE = [
    ("training step: HiPoSeg / cross-entropy", "bench_train_step.py", [],
     ["--backbones", "resnet18", "--size", "64x64", "--output-stride", "16", "--repeats", "1", "--warmup", "0",
      "--branch-sizes", "16x16"]),
    ("DeepLabV3+: hiposeg vs SMP and torchvision", "bench_peers.py", [],
     ["--backbone", "resnet18", "--output-stride", "16", "--size", "64x64", "--infer-size", "64x64",
      "--repeats", "1", "--warmup", "1"]),
    ("inference: exported model / plain DeepLabV3+", "bench_export.py", [],
     ["--backbones", "resnet18", "--size", "64x64", "--output-stride", "16", "--repeats", "1", "--warmup", "0"]),
    ("data: prepare vs the decode-LUT-encode floor", "bench_prepare.py", ["--images", "20"],
     ["--images", "2", "--size", "128x256", "--workers", "1", "--repeat", "1"]),
    ("data: training loader vs training step", "bench_loader.py", [], ["--images", "8", "--steps", "2"]),
    ("DDP: 2 CPU processes vs 1", "bench_ddp.py", [], ["--iters", "4", "--batch", "4"]),
    ("--compile: compiled / eager training step and inference", "bench_compile.py", [],
     ["--size", "32x32", "--repeats", "1", "--warmup", "0"]),
    ("plot: feature map at 19 classes x 1,000 pixels", "bench_plots.py", [],
     ["--pixels-per-class", "20", "--methods", "pca"]),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the smallest sizes: checks that every benchmark runs")
    tiny = p.parse_args(argv).tiny
    failed = []
    for title, script, cpu_args, tiny_args in SUITE:
        print(f"\n=== {title} ===", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / script), *(tiny_args if tiny else cpu_args)])
        if rc:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
