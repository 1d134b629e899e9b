"""DDP on the CPU: 2 gloo processes vs 1 process, same global batch, same data, images/s.

Both runs go through `engine.fit` (the real training path, `--gpus 2 --device cpu` vs 1 process).
Throughput is taken from metrics.jsonl after the first log interval (start-up excluded). On a
machine with C cores each of the 2 processes gets C/2 threads, so the ratio shows the overhead of
the DDP machinery (gradient all-reduce, prototype all-reduce, buffer broadcast) rather than a speed-up.

    python benchmarks/bench_ddp.py                 # synthetic recipe, 40 iterations each
    python benchmarks/bench_ddp.py --iters 100 --batch 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from hiposeg.config import build_config
from hiposeg.data.synthetic import generate
from hiposeg.engine import fit


def images_per_s(run: Path, batch: int) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["it_per_s"] for r in rows if "it_per_s" in r][1:]
    return sum(speeds) / len(speeds) * batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "data", train=64, val=2, size=128, seed=0).out
        result = {}
        for procs in (1, 2):
            cfg = build_config({"data": {"dataset": "synthetic", "root": str(data), "workers": 1},
                                "optim": {"iters": args.iters, "batch_size": args.batch},
                                "run": {"out": f"{tmp}/run{procs}", "gpus": procs, "device": "cpu", "quiet": True,
                                        # >= 2 speed rows: the first (start-up) is dropped
                                        "log_every": max(1, min(5, args.iters // 4)), "ckpt_every": 10_000}})
            fit(cfg)
            result[procs] = images_per_s(Path(f"{tmp}/run{procs}"), args.batch)
    print(f"synthetic recipe, global batch {args.batch}, {args.iters} iterations, CPU gloo")
    for procs, ips in result.items():
        print(f"{procs} process(es): {ips:7.2f} img/s")
    print(f"2 processes / 1 process = {result[2] / result[1]:.2f}")


if __name__ == "__main__":
    main()
