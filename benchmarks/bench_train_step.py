"""Cost of the HiPoSeg branch: one training step with every term active vs the cross-entropy-only step.

Measured side by side in one run: the same segmenter weights (two copies), the same batch and input;
the baseline has no projection head and a CE-only criterion, the HiPoSeg step has the head and every
term active (iteration past all phases). Repeats are interleaved (CE, HiPoSeg, CE, HiPoSeg, ...) after
warm-up, and the ratio is of the medians. A step is forward + backward + SGD step.

Memory: on CUDA, torch.cuda.max_memory_allocated over a step. On the CPU there is no allocator
statistic, so the script reports an estimate of what a step holds at its peak: the bytes of all
tensors autograd saves for backward (unique storages, parameters excluded) + 3x the parameter bytes
(weights, gradients, SGD momentum).

Then the branch alone (criterion forward + backward on random unit embeddings, labels and logits at
the embedding resolution so CE is negligible) minus the CE-only criterion, for the class counts of
Cityscapes (19/7), Mapillary Vistas 2.0 (124/17) and ADE20K (150/14) and growing pixel counts.

    python benchmarks/bench_train_step.py                         # CPU sizes (a couple of minutes)
    python benchmarks/bench_train_step.py --device cuda --amp bf16 --backbones resnet101 \\
        --batch 2 --size 512x1024 --repeats 20                    # the paper's per-GPU setting
    python benchmarks/bench_train_step.py --models hrnet:hrnet_w18_small segformer:mit_b0 --skip-branch
                                                                  # other families (FAMILY:VARIANT)
Goal: ratio <= 1.10 at the CPU sizes, <= 1.05 at 512x1024 on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hiposeg.config import LossConfig, ModelConfig  # noqa: E402
from hiposeg.hierarchy import Hierarchy  # noqa: E402
from hiposeg.models import build_segmenter  # noqa: E402
from hiposeg.models.training import HiPoSegNet  # noqa: E402
from hiposeg.prototypes import HiPoSegCriterion  # noqa: E402

from common import autocast, models_of, parse_size, random_batch, sync  # noqa: E402  (benchmarks/common.py: run as a script)

TOTAL_ITERS = 1000
LAST_ITER = TOTAL_ITERS - 1  # past every phase boundary: all terms active
HIERARCHIES = {19: "cityscapes", 124: "mapillary_v2", 150: "ade20k"}


class Trainer:
    """One (net, criterion, optimiser) triple and its step."""

    def __init__(self, net: HiPoSegNet, crit: HiPoSegCriterion, device: torch.device, amp: str) -> None:
        self.net, self.crit, self.device, self.amp = net.to(device).train(), crit.to(device), device, amp
        self.opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training forward and the criterion, as `engine.step` runs them."""
        with autocast(self.device, self.amp):
            out = self.net(x, with_embeddings=self.crit.needs_embeddings)
        return self.crit(out.logits, out.embeddings, y, LAST_ITER, aux_logits=out.aux_logits)[0]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.scaler.scale(self.loss(x, y)).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def timed_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.step(x, y)
        sync(self.device)
        return time.perf_counter() - t0

    def peak_bytes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """What this trainer needs at the peak of a step, alone on the device (inputs excluded)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            resident = torch.cuda.memory_allocated(self.device)  # both trainers' weights and momentum, inputs
            self.step(x, y)
            # the step's own growth (activations, gradients, workspaces) + this trainer's weights and momentum
            return torch.cuda.max_memory_allocated(self.device) - resident + 2 * self.param_bytes()
        return self.saved_bytes(x, y) + 3 * self.param_bytes()  # + weights, gradients, SGD momentum

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.net.parameters())

    def saved_bytes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Bytes of the unique storages autograd saves for backward during one forward (params excluded)."""
        params = {p.untyped_storage().data_ptr() for p in self.net.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss(x, y)
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return sum(seen.values())


def bench_step(args: argparse.Namespace, model: tuple[str, str], batch: int, size: tuple[int, int],
               device: torch.device) -> dict:
    hier = Hierarchy.load("cityscapes")
    torch.manual_seed(0)
    cfg = ModelConfig(name=model[0], backbone=model[1], output_stride=args.output_stride)
    seg = build_segmenter(cfg, hier.num_fine)
    backbone = cfg.backbone if cfg.name == "deeplabv3plus" else f"{cfg.name}:{cfg.backbone}"
    ce_net = HiPoSegNet(copy.deepcopy(seg), embed_dim=args.embed_dim, with_projection=False)
    hp_net = HiPoSegNet(seg, embed_dim=args.embed_dim, with_projection=True)
    if args.channels_last:
        ce_net, hp_net = ce_net.to(memory_format=torch.channels_last), hp_net.to(memory_format=torch.channels_last)
    crit = lambda terms: HiPoSegCriterion(LossConfig(terms=terms), hier.fine_to_coarse, args.embed_dim,  # noqa: E731
                                          hier.ignore_index, TOTAL_ITERS)
    ce = Trainer(ce_net, crit(["ce"]), device, args.amp)
    hp = Trainer(hp_net, crit(["ce", "fh", "hh", "fl", "ll", "align"]), device, args.amp)
    x, y = random_batch(batch, size, hier.num_fine, hier.ignore_index, device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(args.warmup):
        ce.step(x, y)
        hp.step(x, y)
    times: dict[str, list[float]] = {"ce": [], "hp": []}
    for _ in range(args.repeats):  # interleaved, so drift and neighbours' load hit both alike
        times["ce"].append(ce.timed_step(x, y))
        times["hp"].append(hp.timed_step(x, y))
    mem_ce, mem_hp = ce.peak_bytes(x, y), hp.peak_bytes(x, y)
    t_ce, t_hp = statistics.median(times["ce"]), statistics.median(times["hp"])
    return {"backbone": backbone, "batch": batch, "size": f"{size[0]}x{size[1]}", "ce_ms": 1e3 * t_ce,
            "hp_ms": 1e3 * t_hp, "ratio": t_hp / t_ce, "ratio_min": min(times["hp"]) / min(times["ce"]),
            "spread": max(times["ce"] + times["hp"]) / min(times["ce"] + times["hp"]) - 1,
            "mem_ce": mem_ce / 2**20, "mem_hp": mem_hp / 2**20, "mem_ratio": mem_hp / mem_ce}


def bench_branch(args: argparse.Namespace, num_fine: int, emb_size: tuple[int, int], device: torch.device) -> dict:
    hier = Hierarchy.load(HIERARCHIES[num_fine])
    gen = torch.Generator().manual_seed(0)
    B, d = args.branch_batch, args.embed_dim
    raw = torch.randn(B, d, *emb_size, generator=gen).to(device)
    emb = torch.nn.functional.normalize(raw, dim=1).requires_grad_()
    logits = torch.randn(B, hier.num_fine, *emb_size, generator=gen).to(device).requires_grad_()
    y = torch.randint(hier.num_fine, (B, *emb_size), generator=gen).to(device)
    full = HiPoSegCriterion(LossConfig(), hier.fine_to_coarse, d, hier.ignore_index, TOTAL_ITERS).to(device)
    ce_only = HiPoSegCriterion(LossConfig(terms=["ce"]), hier.fine_to_coarse, d, hier.ignore_index, TOTAL_ITERS).to(device)

    def run(crit: nn.Module) -> float:
        sync(device)
        t0 = time.perf_counter()
        loss, _ = crit(logits, emb if crit.needs_embeddings else None, y, LAST_ITER)
        loss.backward()
        sync(device)
        emb.grad = logits.grad = None
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        run(full), run(ce_only)
    t_full, t_ce = [], []
    for _ in range(args.repeats):
        t_full.append(run(full))
        t_ce.append(run(ce_only))
    branch = min(t_full) - min(t_ce)  # fastest of each: robust to other load
    return {"classes": f"{hier.num_fine}/{hier.num_coarse}", "pixels": B * emb_size[0] * emb_size[1],
            "emb": f"{B}x{d}x{emb_size[0]}x{emb_size[1]}", "branch_ms": 1e3 * branch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--backbones", nargs="+", default=["resnet18", "resnet101"], help="DeepLabV3+ backbones")
    p.add_argument("--models", nargs="+", default=None, help="FAMILY:VARIANT instead, e.g. hrnet:hrnet_w18_small "
                                                             "segformer:mit_b0 fpn:efficientnet-b0 unet:resnet18")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=parse_size, default=(128, 256), help="input HxW (paper: 512x1024)")
    p.add_argument("--output-stride", type=int, default=8, choices=[8, 16])
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--branch-batch", type=int, default=2)
    p.add_argument("--branch-sizes", type=parse_size, nargs="+", default=[(32, 64), (64, 128), (128, 256)],
                   help="embedding HxW for the branch-only table (128x256 = stride 4 of 512x1024)")
    p.add_argument("--skip-branch", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
          + f", amp {args.amp}, OS{args.output_stride}, d'={args.embed_dim}, {args.repeats} interleaved repeats "
          f"after {args.warmup} warm-up steps")
    mem_how = "CUDA max_memory_allocated" if device.type == "cuda" else "autograd-saved tensors + 3x params (estimate)"

    print(f"\nTraining step: HiPoSeg (all terms) vs CE only; memory = {mem_how}")
    header = f"{'model':<22} {'batch':>5} {'input':>9} {'CE ms':>9} {'HiPoSeg ms':>11} {'time x':>7} {'min x':>6} " \
             f"{'spread':>7} {'CE MiB':>8} {'HiPoSeg MiB':>11} {'mem x':>6}"
    print(header)
    print("-" * len(header))
    for model in models_of(args.models, args.backbones):
        r = bench_step(args, model, args.batch, args.size, device)
        print(f"{r['backbone']:<22} {r['batch']:>5} {r['size']:>9} {r['ce_ms']:>9.1f} {r['hp_ms']:>11.1f} "
              f"{r['ratio']:>7.3f} {r['ratio_min']:>6.3f} {r['spread']:>6.0%} {r['mem_ce']:>8.0f} {r['mem_hp']:>11.0f} "
              f"{r['mem_ratio']:>6.3f}")

    if not args.skip_branch:
        print("\nBranch alone: criterion forward+backward, all terms minus CE only (fastest of --repeats; "
              "labels at embedding size)")
        header = f"{'fine/coarse':>11} {'embeddings':>18} {'pixels':>8} {'branch ms':>10} {'us/pixel':>9}"
        print(header)
        print("-" * len(header))
        for size in args.branch_sizes:
            for k in HIERARCHIES:
                r = bench_branch(args, k, size, device)
                print(f"{r['classes']:>11} {r['emb']:>18} {r['pixels']:>8} {r['branch_ms']:>10.2f} "
                      f"{1e3 * r['branch_ms'] / r['pixels']:>9.2f}")
    print("\nms: medians; time x: ratio of medians; min x: ratio of the fastest steps (robust to other load);"
          "\nspread: slowest / fastest step - 1 over both runs (large = a noisy machine: rerun with more --repeats).")


if __name__ == "__main__":
    main()
