"""Inference cost of an exported HiPoSeg model vs a plain DeepLabV3+ of the same configuration.

The paper claims the prototype branch costs nothing at inference. This script checks that the model
`hiposeg export` writes is exactly the baseline: it builds a training model WITH the branch (projection
head + filled prototype memory), writes a real training checkpoint of it (`engine.make_checkpoint`),
exports it in each requested format, loads it as `predict`/`eval` do, and times its forward pass
against a freshly built plain DeepLabV3+ (same backbone, output stride, class count; its own random
weights). Side by side in one process, repeats interleaved (plain, exported, plain, exported, ...)
after warm-up; the ratio is of the medians. Parameter counts are compared exactly.

Peak memory: on CUDA, torch.cuda.max_memory_allocated over one forward (weights + activations). On
the CPU PyTorch keeps no allocator statistics, so only the bytes of weights and buffers are compared.

    python benchmarks/bench_export.py                                  # CPU: ResNet-18 and -101 at 256x512
    python benchmarks/bench_export.py --device cuda --size 1024x2048 --repeats 20   # a Cityscapes frame
    python benchmarks/bench_export.py --formats hiposeg,torch-export,onnx           # onnx: needs onnxruntime
Goal: latency ratio 1.00 within noise, parameter ratio exactly 1.00.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hiposeg import checkpoint  # noqa: E402
from hiposeg.config import build_config  # noqa: E402
from hiposeg.checkpoint import make_checkpoint  # noqa: E402
from hiposeg.engine import build_model  # noqa: E402
from hiposeg.export import count_parameters, export_model, load_inference_model  # noqa: E402
from hiposeg.hierarchy import Hierarchy  # noqa: E402
from hiposeg.models.deeplabv3plus import DeepLabV3Plus  # noqa: E402

from common import parse_size, sync  # noqa: E402  (benchmarks/common.py: run as a script)


def training_checkpoint(backbone: str, output_stride: int, folder: Path) -> Path:
    """A real `hiposeg train` checkpoint of a model with the HiPoSeg branch and a filled memory."""
    h = Hierarchy.load("cityscapes")
    cfg = build_config({"data": {"dataset": "cityscapes"}, "model": {"backbone": backbone,
                                                                     "output_stride": output_stride}})
    net, criterion = build_model(cfg, h)
    with torch.no_grad():  # every class seen once: the memory holds K_fine + K_coarse unit prototypes
        for buf in criterion.buffers():
            if buf.is_floating_point():
                buf.copy_(torch.nn.functional.normalize(torch.randn_like(buf), dim=-1) if buf.ndim == 2
                          else torch.ones_like(buf))
            elif buf.dtype == torch.bool:
                buf.fill_(True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    best = {"metric": "fine_mIoU", "value": None, "iteration": None}
    path = folder / f"{backbone}.pt"
    checkpoint.save(make_checkpoint(cfg, h, net, criterion, optimizer, scaler, iteration=0, best=best, last_eval=None,
                                    run_id="benchmark"), path)
    return path


def time_forward(model, x: torch.Tensor, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        model(x)
    sync(device)
    return time.perf_counter() - t


def peak_memory(model, x: torch.Tensor, device: torch.device) -> int | None:  # type: ignore[no-untyped-def]
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        model(x)
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def bench(backbone: str, fmt: str, args: argparse.Namespace, device: torch.device, folder: Path,
          ckpt: Path) -> dict[str, object]:
    out = folder / f"{backbone}-{fmt}"
    summary = export_model(ckpt, out, fmt=fmt)
    exported = load_inference_model(out, device=device).module
    plain = DeepLabV3Plus(19, backbone, args.output_stride).to(device).eval()
    h, w = args.size
    x = torch.randn(args.batch, 3, h, w, device=device)
    for _ in range(args.warmup):
        time_forward(plain, x, device)
        time_forward(exported, x, device)
    t_plain, t_exp = [], []
    for _ in range(args.repeats):  # interleaved: drifts in clock or load hit both alike
        t_plain.append(time_forward(plain, x, device))
        t_exp.append(time_forward(exported, x, device))
    mem_plain, mem_exp = peak_memory(plain, x, device), peak_memory(exported, x, device)
    return {"backbone": backbone, "format": fmt, "plain_ms": 1e3 * statistics.median(t_plain),
            "exported_ms": 1e3 * statistics.median(t_exp),
            "spread": 1e3 * (statistics.pstdev(t_plain) + statistics.pstdev(t_exp)) / 2,
            "params": summary.parameters, "plain_params": count_parameters(plain),
            "training_params": summary.training_parameters, "memory_values": summary.memory_values,
            "plain_bytes": state_bytes(plain), "exported_bytes": state_bytes(exported) if fmt == "hiposeg" else None,
            "peak_plain": mem_plain, "peak_exported": mem_exp, "diff": summary.max_abs_diff}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="resnet18,resnet101")
    p.add_argument("--formats", default="hiposeg,torch-export", help="comma list of hiposeg, torch-export, onnx")
    p.add_argument("--size", type=parse_size, default=(256, 512), help="input HxW (default 256x512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--output-stride", type=int, default=8, choices=(8, 16))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: PyTorch sees no CUDA GPU on this machine", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device} ({torch.get_num_threads()} threads), input {args.batch}x3x{args.size[0]}x{args.size[1]}, "
          f"OS{args.output_stride}, 19 classes, {args.repeats} interleaved repeats after {args.warmup} warm-up")
    header = (f"{'backbone':<10} {'format':<13} {'plain ms':>9} {'export ms':>9} {'ratio':>6} {'± ms':>6} "
              f"{'params':>11} {'ratio':>6} {'train params':>12} {'memory':>7} {'peak MiB p/e':>13} {'max|Δ|':>8}")
    print(header)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for backbone in args.backbones.split(","):
            ckpt = training_checkpoint(backbone, args.output_stride, folder)
            for fmt in args.formats.split(","):
                r = bench(backbone, fmt, args, device, folder, ckpt)
                rows.append(r)
                peak = ("n/a (CPU)" if r["peak_plain"] is None
                        else f"{r['peak_plain'] / 2**20:.0f}/{r['peak_exported'] / 2**20:.0f}")
                print(f"{backbone:<10} {fmt:<13} {r['plain_ms']:>9.1f} {r['exported_ms']:>9.1f} "
                      f"{r['exported_ms'] / r['plain_ms']:>6.3f} {r['spread']:>6.1f} {r['params']:>11,} "
                      f"{r['params'] / r['plain_params']:>6.3f} {r['training_params']:>12,} {r['memory_values']:>7,} "
                      f"{peak:>13} {r['diff']:>8.1e}", flush=True)
    bad = [r for r in rows if r["params"] != r["plain_params"]]
    if bad:
        print("FAIL: an exported model has a different parameter count than the plain DeepLabV3+")
        return 1
    print("parameters: exported == plain DeepLabV3+ for every backbone and format (the head and memory are not "
          "exported); 'train params' is the training model with its projection head, 'memory' the prototype "
          "values left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
