"""Is the training data loader ever the bottleneck?

Side by side in one run, on the same prepared data and the same model:
  1. loader alone      images/s of the training DataLoader (train transforms, default workers)
  2. step alone        images/s of forward + backward + SGD on pre-loaded batches
  3. training loop     both together, as `engine.fit` runs them; `wait` = share of the loop's time
                       spent blocked in `next(loader)`
The ratio loader/step must stay > 1 and `wait` near 0 at the recipe's default worker count.

    python benchmarks/bench_loader.py                          # the synthetic recipe (CPU)
    python benchmarks/bench_loader.py --size 1024x2048 --crop 512x1024 --backbone resnet101 --batch 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from hiposeg.config import build_config
from hiposeg.data.dataset import open_prepared
from hiposeg.data.sampler import train_loader
from hiposeg.engine import build_model
from hiposeg.distributed import DistEnv


def make_data(root: Path, size: tuple[int, int], n: int) -> Path:
    """A prepared dataset: the synthetic generator at 128x128, or random scenes at a large size."""
    from hiposeg.data.synthetic import generate

    if size == (128, 128):
        return generate(root, train=n, val=2, size=128, seed=0)
    generate(root, train=2, val=2, size=128, seed=0)  # hierarchy + manifest + layout
    rng = np.random.default_rng(0)
    h, w = size
    for split in ("train",):
        for sub in ("images", "fine", "coarse"):
            for p in (root / split / sub).iterdir():
                p.unlink()
        for i in range(n):
            img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3)
            lab = cv2.resize(rng.integers(0, 15, (h // 32, w // 32), dtype=np.uint8), (w, h),
                             interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(root / split / "images" / f"s{i:04d}.png"), img)
            cv2.imwrite(str(root / split / "fine" / f"s{i:04d}.png"), lab)
            cv2.imwrite(str(root / split / "coarse" / f"s{i:04d}.png"), lab // 3)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="128x128", help="image size HxW of the prepared data")
    ap.add_argument("--crop", default=None, help="training crop (default: the synthetic recipe's)")
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        root = make_data(Path(tmp) / "data", size, args.images)
        over: dict = {"data": {"dataset": "synthetic", "root": str(root)}, "run": {"device": "cpu"}}
        if args.crop:
            over["data"]["crop"] = tuple(int(v) for v in args.crop.split("x"))
        if args.workers is not None:
            over["data"]["workers"] = args.workers
        if args.backbone:
            over["model"] = {"backbone": args.backbone}
        if args.batch:
            over["optim"] = {"batch_size": args.batch}
        cfg = build_config(over)
        env = DistEnv()
        b = cfg.optim.batch_size
        hierarchy, _ = open_prepared(root, cfg.data.train_split)
        loader = train_loader(cfg, env, 0, hierarchy.ignore_index)
        batches = iter(loader)
        next(batches)  # start the workers

        t = time.perf_counter()
        kept = [next(batches) for _ in range(args.steps)]
        loader_ips = args.steps * b / (time.perf_counter() - t)

        net, criterion = build_model(cfg, hierarchy)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        it_all = int(cfg.optim.iters * 0.5)  # every term active

        def step(batch: dict) -> None:
            logits, emb = net(batch["image"], with_embeddings=criterion.needs_embeddings)
            loss, _ = criterion(logits, emb, batch["fine"], it_all)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(kept[0])
        t = time.perf_counter()
        for batch in kept:
            step(batch)
        step_ips = args.steps * b / (time.perf_counter() - t)

        waited, t = 0.0, time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t0
            step(batch)
        total = time.perf_counter() - t
        loop_ips = args.steps * b / total

    print(f"data {size[0]}x{size[1]}, crop {cfg.data.crop[0]}x{cfg.data.crop[1]}, {cfg.model.backbone}, batch {b}, "
          f"workers {cfg.data.workers}, torch threads {torch.get_num_threads()}")
    print(f"{'loader alone':>16}: {loader_ips:8.1f} img/s")
    print(f"{'step alone':>16}: {step_ips:8.1f} img/s")
    print(f"{'training loop':>16}: {loop_ips:8.1f} img/s   waiting on data {waited / total * 100:.1f}% of the time")
    print(f"loader / step = {loader_ips / step_ips:.2f}  (must be > 1)")


if __name__ == "__main__":
    main()
