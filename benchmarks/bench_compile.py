"""What `--compile` buys: torch.compile'd vs eager training step and inference, side by side.

One process, the same weights twice (two copies), the same batch. Training: HiPoSegNet with every
loss term active (past all phases), forward + backward + SGD, the network compiled as `train
--compile` does (`hiposeg.compile.CompiledOrEager`; the loss terms stay eager). Inference: the plain
DeepLabV3+ under no_grad, compiled as `predict --compile` does. The first compiled call (the
compilation) is timed on its own; then repeats are interleaved (eager, compiled, eager, ...) and the
ratio is of the medians. A compilation that fails falls back to eager and is reported as such.

    python benchmarks/bench_compile.py                     # CPU sizes: ResNet-18, 2x128x256
    python benchmarks/bench_compile.py --device cuda --amp bf16 --backbone resnet101 --size 512x1024 --repeats 10
Goal: compiled / eager < 1 (faster) once compiled; the compilation time is paid once per run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hiposeg.compile import CompiledOrEager  # noqa: E402
from hiposeg.config import LossConfig  # noqa: E402
from hiposeg.hierarchy import Hierarchy  # noqa: E402
from hiposeg.models.deeplabv3plus import DeepLabV3Plus  # noqa: E402
from hiposeg.models.training import HiPoSegNet  # noqa: E402
from hiposeg.prototypes import HiPoSegCriterion  # noqa: E402

from bench_export import time_forward  # noqa: E402
from bench_train_step import TOTAL_ITERS, Trainer  # noqa: E402
from common import autocast, parse_size, random_batch  # noqa: E402


def interleaved(eager, compiled, repeats: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Median seconds of two zero-argument timers, called alternately `repeats` times each."""
    t_e, t_c = [], []
    for _ in range(repeats):
        t_e.append(eager())
        t_c.append(compiled())
    return {"eager_ms": 1e3 * statistics.median(t_e), "compiled_ms": 1e3 * statistics.median(t_c),
            "ratio": statistics.median(t_c) / statistics.median(t_e)}


def first_call(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_step(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Eager vs compiled HiPoSeg training step (every term active)."""
    hier = Hierarchy.load("cityscapes")
    torch.manual_seed(0)
    net = HiPoSegNet(DeepLabV3Plus(hier.num_fine, args.backbone, args.output_stride), embed_dim=256,
                     with_projection=True)
    crit = lambda: HiPoSegCriterion(LossConfig(), hier.fine_to_coarse, 256, hier.ignore_index,  # noqa: E731
                                    TOTAL_ITERS)
    eager, compiled = Trainer(net, crit(), device, args.amp), Trainer(copy.deepcopy(net), crit(), device, args.amp)
    wrapper = CompiledOrEager(compiled.net, "training model")
    compiled.net = wrapper  # Trainer.step calls self.net(...): now through torch.compile
    x, y = random_batch(args.batch, args.size, hier.num_fine, hier.ignore_index, device)
    compile_s = first_call(lambda: compiled.step(x, y))
    for _ in range(args.warmup):
        eager.step(x, y), compiled.step(x, y)
    r = interleaved(lambda: eager.timed_step(x, y), lambda: compiled.timed_step(x, y), args.repeats)
    return {"what": "training step", **r, "compile_s": compile_s, "fallback": wrapper.fallback}


def bench_inference(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Eager vs compiled plain DeepLabV3+ forward (what an exported model runs)."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(19, args.backbone, args.output_stride).to(device).eval()
    wrapper = CompiledOrEager(model, "inference model")
    x = torch.randn(1, 3, *args.size, device=device)

    def run(fn):  # type: ignore[no-untyped-def]
        with autocast(device, args.amp):
            return time_forward(fn, x, device)

    compile_s = first_call(lambda: run(wrapper))
    for _ in range(args.warmup):
        run(model), run(wrapper)
    r = interleaved(lambda: run(model), lambda: run(wrapper), args.repeats)
    return {"what": "inference (batch 1)", **r, "compile_s": compile_s, "fallback": wrapper.fallback}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50", "resnet101"])
    p.add_argument("--output-stride", type=int, default=16, choices=[8, 16])
    p.add_argument("--batch", type=int, default=2, help="training batch (inference uses 1 image)")
    p.add_argument("--size", type=parse_size, default=(128, 256), help="input HxW")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="calls after the compiling one, before timing")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--skip-inference", action="store_true")
    return p


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    """The rows of the table (also called by the GPU suite, `benchmarks/gpu.py`)."""
    device = torch.device(args.device)
    rows = [] if args.skip_step else [bench_step(args, device)]
    return rows if args.skip_inference else [*rows, bench_inference(args, device)]


def main() -> int:
    args = parser().parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: PyTorch sees no CUDA GPU on this machine", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, {args.backbone} "
          f"OS{args.output_stride}, input {args.size[0]}x{args.size[1]}, amp {args.amp}, {args.repeats} interleaved "
          f"repeats after {args.warmup} warm-up call(s)")
    header = f"{'':<20} {'eager ms':>9} {'compiled ms':>11} {'compiled/eager':>14} {'compile s':>9}"
    print(header)
    for r in measure(args):
        note = f"  (fell back to eager: {r['fallback']})" if r["fallback"] else ""
        print(f"{r['what']:<20} {r['eager_ms']:>9.1f} {r['compiled_ms']:>11.1f} {r['ratio']:>14.3f} "
              f"{r['compile_s']:>9.1f}{note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
