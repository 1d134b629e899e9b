"""hiposeg's DeepLabV3+ vs what a user would pick instead: segmentation_models_pytorch's DeepLabV3Plus
and torchvision's deeplabv3 (no decoder), same backbone depth, output stride, classes and input.

Training step (forward + cross-entropy + backward + SGD step) and inference (eval mode, no_grad
forward), every contender side by side in one process, repeats interleaved (hiposeg, SMP,
torchvision, hiposeg, ...) after warm-up; ratios against SMP's DeepLabV3Plus, of the medians and of
the fastest repeats (the fastest is the robust one on a shared machine). hiposeg is timed as
`hiposeg train` builds it (`engine.build_model`): `hiposeg CE` is a `--losses ce` run (no projection
head), `HiPoSeg` the default run with the projection head and every loss term active. Parameter
counts are printed for each model; hiposeg's exported model is its segmenter (`hiposeg CE`).

    python benchmarks/bench_peers.py                              # CPU sizes: ResNet-50, OS8, 2x128x256 / 1x256x512
    python benchmarks/bench_peers.py --device cuda --amp bf16 --channels-last --backbone resnet101 \\
        --batch 8 --size 512x1024 --infer-size 1024x2048 --repeats 20    # a GPU, the paper's sizes
Goal: hiposeg CE <= 1.00x SMP for training and inference; HiPoSeg <= 1.10x SMP's CE step on CPU sizes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hiposeg.config import build_config  # noqa: E402
from hiposeg.engine import build_model  # noqa: E402
from hiposeg.hierarchy import Hierarchy  # noqa: E402
from hiposeg.models.deeplabv3plus import ASPP_RATES  # noqa: E402

from common import autocast, interleaved, median_ms, min_ms, parse_size, random_batch  # noqa: E402  (benchmarks/common.py)

IGNORE = 255
LAST_ITER = 10**6 - 1  # past every phase boundary of a 10**6-iteration schedule: every term active


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------
# The contenders: a module, how to get its logits, how its training step computes the loss
# ------------------------------------------------------------------------------------------


class Contender:
    """One model: `logits(x)` for inference, `loss(x, y)` for its training step (autocast inside)."""

    def __init__(self, name: str, module: nn.Module, logits: Callable[[torch.Tensor], torch.Tensor],
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], segmenter: nn.Module) -> None:
        self.name, self.module, self.logits, self.loss, self.segmenter = name, module, logits, loss, segmenter


def peer(name: str, module: nn.Module, output: Callable[[object], torch.Tensor], amp: str,
         device: torch.device) -> Contender:
    """A library model trained with plain cross-entropy."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return output(module(x))

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(x).float(), y, ignore_index=IGNORE)

    return Contender(name, module, logits, loss, module)


def hiposeg(name: str, args: argparse.Namespace, losses: list[str], hierarchy: Hierarchy,
            device: torch.device) -> Contender:
    """hiposeg's training model and criterion exactly as `hiposeg train` builds them."""
    cfg = build_config({"data": {"dataset": "cityscapes"}, "loss": {"terms": losses}, "optim": {"iters": 10**6},
                        "model": {"backbone": args.backbone, "output_stride": args.output_stride,
                                  "pretrained": None}})  # random weights, as the peers start
    net, criterion = build_model(cfg, hierarchy)
    criterion.to(device)

    def logits(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, args.amp):
            return net.segmenter(x)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, args.amp):
            out = net(x, with_embeddings=criterion.needs_embeddings)
        return criterion(out.logits, out.embeddings, y, LAST_ITER, aux_logits=out.aux_logits)[0]

    return Contender(name, net, logits, loss, net.segmenter)


def smp_deeplabv3plus(args: argparse.Namespace, classes: int, device: torch.device) -> Contender:
    import segmentation_models_pytorch as smp

    model = smp.DeepLabV3Plus(encoder_name=args.backbone, encoder_weights=None, classes=classes,
                              encoder_output_stride=args.output_stride,
                              decoder_atrous_rates=ASPP_RATES[args.output_stride])
    return peer("SMP DeepLabV3Plus", model, lambda out: out, args.amp, device)


def torchvision_deeplabv3(args: argparse.Namespace, classes: int, device: torch.device) -> Contender | None:
    """torchvision's DeepLabV3 (ASPP, no decoder): ResNet-50/101 at output stride 8 only."""
    from torchvision.models import segmentation

    build = getattr(segmentation, f"deeplabv3_{args.backbone}", None)
    if build is None or args.output_stride != 8:
        return None
    model = build(weights=None, weights_backbone=None, num_classes=classes, aux_loss=False)
    return peer("torchvision deeplabv3", model, lambda out: out["out"], args.amp, device)


def contenders(args: argparse.Namespace, hierarchy: Hierarchy, device: torch.device) -> list[Contender]:
    k = hierarchy.num_fine
    torch.manual_seed(0)
    found = [hiposeg("hiposeg CE", args, ["ce"], hierarchy, device),
             hiposeg("HiPoSeg", args, ["ce", "fh", "hh", "fl", "ll", "align"], hierarchy, device),
             smp_deeplabv3plus(args, k, device), torchvision_deeplabv3(args, k, device)]
    chosen = [c for c in found if c is not None]
    for c in chosen:
        c.module.to(device)
        if args.channels_last:
            c.module.to(memory_format=torch.channels_last)
    return chosen


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------


def make_inputs(batch: int, size: tuple[int, int], classes: int, args: argparse.Namespace,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`common.random_batch`, channels-last with `--channels-last`."""
    x, y = random_batch(batch, size, classes, IGNORE, device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_steps(models: list[Contender], x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
                device: torch.device) -> dict[str, list[float]]:
    def step_of(c: Contender) -> Callable[[], None]:
        opt = torch.optim.SGD(c.module.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

        def step() -> None:
            scaler.scale(c.loss(x, y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        return step

    for c in models:
        c.module.train()
    return interleaved({c.name: step_of(c) for c in models}, device, args.repeats, args.warmup, args.clock)


def inferences(models: list[Contender], x: torch.Tensor, args: argparse.Namespace,
               device: torch.device) -> dict[str, list[float]]:
    def forward_of(c: Contender) -> Callable[[], None]:
        def forward() -> None:
            with torch.no_grad():
                c.logits(x)

        return forward

    for c in models:
        c.module.eval()
    # HiPoSeg's segmenter is hiposeg CE's architecture: its inference is timed once
    runs = {c.name: forward_of(c) for c in models if c.name != "HiPoSeg"}
    return interleaved(runs, device, args.repeats, args.warmup, args.clock)


def print_table(title: str, times: dict[str, list[float]], params: dict[str, int], reference: str) -> dict[str, float]:
    """The table of one measurement; returns each contender's ratio of fastest repeats to `reference`."""
    print(f"\n{title}")
    header = f"{'model':<22} {'parameters':>12} {'median ms':>10} {'min ms':>9} {'x SMP (median)':>15} {'x SMP (min)':>12}"
    print(header)
    print("-" * len(header))
    ratios = {}
    for name, t in times.items():
        ratios[name] = min(t) / min(times[reference])
        print(f"{name:<22} {params[name]:>12,} {median_ms(t):>10.1f} {min_ms(t):>9.1f} "
              f"{median_ms(t) / median_ms(times[reference]):>15.3f} {ratios[name]:>12.3f}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet50", "resnet101"])
    p.add_argument("--output-stride", type=int, default=8, choices=[8, 16])
    p.add_argument("--batch", type=int, default=2, help="training batch")
    p.add_argument("--size", type=parse_size, default=(128, 256), help="training input HxW")
    p.add_argument("--infer-batch", type=int, default=1)
    p.add_argument("--infer-size", type=parse_size, default=(256, 512), help="inference input HxW")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: process CPU time, robust to other load on a shared machine (use with --threads 1)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no CUDA GPU")
    if args.clock == "cpu" and device.type == "cuda":
        p.error("--clock cpu measures CPU work: use the wall clock on a GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    hierarchy = Hierarchy.load("cityscapes")
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
          + f", amp {args.amp}{', channels-last' if args.channels_last else ''}, {args.clock} clock; {args.backbone}, OS{args.output_stride}, "
          f"{hierarchy.num_fine} classes; {args.repeats} interleaved repeats after {args.warmup} warm-up")
    models = contenders(args, hierarchy, device)
    params = {c.name: count(c.segmenter) for c in models}
    params["HiPoSeg"] = count(next(c.module for c in models if c.name == "HiPoSeg"))  # + its projection head
    reference = "SMP DeepLabV3Plus"

    x, y = make_inputs(args.batch, args.size, hierarchy.num_fine, args, device)
    train = print_table(f"Training step, {args.batch}x3x{args.size[0]}x{args.size[1]} (forward + CE + backward + SGD)",
                        train_steps(models, x, y, args, device), params, reference)
    x, _ = make_inputs(args.infer_batch, args.infer_size, hierarchy.num_fine, args, device)
    infer = print_table(f"Inference, {args.infer_batch}x3x{args.infer_size[0]}x{args.infer_size[1]} (eval, no_grad)",
                        inferences(models, x, args, device), params, reference)
    print("\nHiPoSeg: the training model with the projection head and every loss term active; its exported model "
          "is hiposeg CE's segmenter.")
    goals = [("hiposeg CE training step", train["hiposeg CE"], 1.00), ("hiposeg inference", infer["hiposeg CE"], 1.00),
             ("HiPoSeg training step", train["HiPoSeg"], 1.10)]
    for what, ratio, goal in goals:
        print(f"{what} / SMP (fastest repeats): {ratio:.3f}  goal <= {goal:.2f}: {'met' if ratio <= goal else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
