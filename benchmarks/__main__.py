"""Run every benchmark at a small size: `python -m benchmarks` (a few minutes on 2 CPU cores).

Each benchmark is a standalone script with its own flags for larger sizes (see BENCHMARKS.md);
this runner only calls them one after another with their default, CPU-sized arguments.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = [
    ("training step: HiPoSeg / cross-entropy", ["bench_train_step.py"]),
    ("inference: exported model / plain DeepLabV3+", ["bench_export.py"]),
    ("data: prepare vs the decode-LUT-encode floor", ["bench_prepare.py", "--images", "20"]),
    ("data: training loader vs training step", ["bench_loader.py"]),
    ("DDP: 2 CPU processes vs 1", ["bench_ddp.py"]),
    ("plot: feature map at 19 classes x 1,000 pixels", ["bench_plots.py"]),
]


def main() -> int:
    failed = []
    for title, cmd in SUITE:
        print(f"\n=== {title} ===", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        if rc:
            failed.append(cmd[0])
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
