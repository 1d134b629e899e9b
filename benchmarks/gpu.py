"""The GPU suite: everything a short GPU window should prove, in one command (under 8 minutes on one H200).

    python -m benchmarks.gpu --out gpu-results            # on a machine with a CUDA GPU
    python -m benchmarks.gpu --dry-run --out /tmp/rehearsal   # the same code on the CPU at tiny sizes (CI)

Writes OUT/gpu-suite.json and OUT/gpu-suite.md (atomically, after every section, so a run cut short
keeps what it measured), and prints each section's elapsed time. Sections:

  cuda-tests  `pytest -m cuda tests/test_cuda.py`: one row per test (passed / failed / skipped: reason)
  step        HiPoSeg / CE training-step ratio, R-101 2x512x1024 bf16 (bench_train_step.bench_step;
              goal <= 1.05), the bare step's images/s and peak CUDA memory
  train       a real `hiposeg train` (engine.fit, loader included) on synthetic 1024x2048 images at
              512x1024 crops: images/s vs the bare step (goal: the loader is never the bottleneck),
              peak CUDA memory
  latency     the exported model (bench_export: checkpoint -> export -> load) at 1024x2048 in fp32,
              bf16 and channels-last, per model family; goal >= 5 x 2.60 images/s (mmsegmentation's
              DeepLabV3+ R-101 on a V100)
  compile     `--compile`: compiled / eager step and inference (bench_compile.measure)
  peers       benchmarks/bench_peers.py, where it exists

A section that fails is recorded as `failed: <message>` and the suite goes on. Without a CUDA GPU
(and without --dry-run) the command says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from argparse import Namespace
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the bench_*.py scripts import `common` as a sibling
PAPER_V100_IMG_S = 2.60  # mmsegmentation, DeepLabV3+ R-101-D8, 512x1024 model at 1024x2048, V100
LATENCY_GOAL = 5 * PAPER_V100_IMG_S


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU rehearsal (besides the device)."""

    device: str
    amp: str
    backbone: str
    batch: int
    crop: tuple[int, int]
    image: tuple[int, int]  # the synthetic training images (train section)
    frame: tuple[int, int]  # the latency input
    repeats: int
    warmup: int
    train_iters: int
    train_images: int
    workers: int
    compile_backend: str


GPU = Sizes("cuda", "bf16", "resnet101", 2, (512, 1024), (1024, 2048), (1024, 2048), repeats=10, warmup=3,
            train_iters=40, train_images=16, workers=4, compile_backend="inductor")
DRY = Sizes("cpu", "off", "resnet18", 2, (32, 32), (128, 128), (32, 64), repeats=1, warmup=0,
            train_iters=4, train_images=8, workers=0, compile_backend="eager")


@dataclass
class Row:
    section: str
    item: str
    status: str = "ok"  # ok | passed | failed: ... | skipped: ...
    value: float | None = None
    unit: str = ""
    goal: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ==========================================================================================
# Sections: each returns its rows
# ==========================================================================================


def cuda_tests(s: Sizes, tmp: Path) -> list[Row]:
    """The CUDA tests in a child pytest; its JUnit XML gives each test's outcome."""
    xml = tmp / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", f"--junitxml={xml}",
           "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
    if not xml.exists():
        return [Row("cuda-tests", "pytest", f"failed: exit code {done.returncode}: {done.stdout[-300:]}")]
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = next(iter(case), None)  # <failure>, <error>, <skipped>, or nothing: passed
        status = "passed"
        if outcome is not None and outcome.tag in ("failure", "error", "skipped"):
            word = "skipped" if outcome.tag == "skipped" else "failed"
            status = f"{word}: {(outcome.get('message') or outcome.tag).splitlines()[0][:200]}"
        rows.append(Row("cuda-tests", case.get("name", "?"), status, extra={"seconds": float(case.get("time", 0))}))
    return rows


def step_ratio(s: Sizes, tmp: Path) -> list[Row]:
    from bench_train_step import bench_step

    import torch

    args = Namespace(output_stride=8, embed_dim=256, channels_last=False, amp=s.amp, warmup=s.warmup,
                     repeats=max(s.repeats, 2))
    r = bench_step(args, ("deeplabv3plus", s.backbone), s.batch, s.crop, torch.device(s.device))
    what = f"{s.backbone} {s.batch}x{s.crop[0]}x{s.crop[1]} {s.amp}"
    mem = "CUDA max_memory_allocated" if s.device == "cuda" else "CPU estimate: autograd-saved + 3x params"
    return [Row("step", f"HiPoSeg / CE step time, {what}", value=r["ratio"], unit="x", goal="<= 1.05",
                extra={k: r[k] for k in ("ce_ms", "hp_ms", "ratio_min", "spread")}),
            Row("step", f"bare HiPoSeg step, {what}", value=1e3 * s.batch / r["hp_ms"], unit="img/s"),
            Row("step", f"peak memory, bare HiPoSeg step ({mem})", value=r["mem_hp"], unit="MiB",
                extra={"ce_mib": r["mem_ce"], "ratio": r["mem_ratio"]})]


def real_training(s: Sizes, tmp: Path) -> list[Row]:
    """`hiposeg train`'s engine on synthetic images, loader included; images/s from metrics.jsonl."""
    from bench_loader import make_data

    from hiposeg.config import build_config
    from hiposeg.engine import fit

    data = tmp / "data"
    make_data(data, s.image, s.train_images)
    log_every = max(s.train_iters // 8, 1)
    cfg = build_config({
        "data": {"dataset": "synthetic", "root": str(data), "crop": s.crop, "workers": s.workers},
        "model": {"backbone": s.backbone, "output_stride": 8},
        "optim": {"iters": s.train_iters, "batch_size": s.batch},
        "run": {"out": str(tmp / "run"), "device": s.device, "amp": s.amp, "log_every": log_every,
                "ckpt_every": s.train_iters, "quiet": True, "eval_mode": "whole"}})
    reset_peak(s.device)
    t0 = time.perf_counter()
    fit(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["it_per_s"] for r in rows if "it_per_s" in r]
    steady = speeds[1:] or speeds  # the first log interval holds the warm-up (cudnn autotuning, workers)
    what = f"{s.backbone} batch {s.batch}, {s.image[0]}x{s.image[1]} images, {s.crop[0]}x{s.crop[1]} crops, {s.amp}"
    return [Row("train", f"hiposeg train, {what}", value=statistics.median(steady) * s.batch, unit="img/s",
                goal=">= 0.95 x the bare step (loader never the bottleneck)",
                extra={"iters": s.train_iters, "workers": s.workers, "wall_s_incl_setup_and_eval": wall}),
            Row("train", "peak memory, hiposeg train (CUDA max_memory_allocated)", value=peak_mib(s.device),
                unit="MiB", status="ok" if s.device == "cuda" else "skipped: no CUDA allocator statistics on the CPU")]


def latency(s: Sizes, tmp: Path) -> list[Row]:
    """Each registered model family's exported model at one frame: fp32, bf16, channels-last; DeepLabV3+
    at the suite's backbone, the others at their paper-scale variant on the GPU (the smallest in the
    rehearsal). A family whose optional package is missing is a skipped row."""
    from hiposeg.errors import UserError
    from hiposeg.models import FAMILIES

    rows = []
    for name, family in FAMILIES.items():
        variant = s.backbone if name == "deeplabv3plus" else (
            family.default_variant if s.device == "cuda" else family.variants[0])
        try:
            family.require()
        except UserError as e:
            rows.append(Row("latency", name, f"skipped: {e.message}"))
            continue
        rows += family_latency(s, tmp, name, variant)
    return rows


def family_latency(s: Sizes, tmp: Path, family: str, variant: str) -> list[Row]:
    import torch
    from bench_export import model_config, time_forward, training_checkpoint
    from common import autocast

    from hiposeg.export import export_model, load_inference_model

    ckpt = training_checkpoint(model_config((family, variant), 8), tmp)
    export_model(ckpt, tmp / f"{family}.pt")
    model = load_inference_model(tmp / f"{family}.pt", device=torch.device(s.device)).module.eval()
    device = torch.device(s.device)
    x = torch.randn(1, 3, *s.frame, device=device)
    rows = []
    for label, amp, layout in (("fp32", "off", torch.contiguous_format), ("bf16", "bf16", torch.contiguous_format),
                               ("fp32 channels-last", "off", torch.channels_last),
                               ("bf16 channels-last", "bf16", torch.channels_last)):
        model = model.to(memory_format=layout)
        xi = x.contiguous(memory_format=layout)

        def once() -> float:
            with autocast(device, amp):
                return time_forward(model, xi, device)

        for _ in range(s.warmup):
            once()
        reset_peak(s.device)
        median = statistics.median(once() for _ in range(s.repeats))
        rows.append(Row("latency", f"{family} {variant} exported, 1x{s.frame[0]}x{s.frame[1]}, {label}",
                        value=1 / median, unit="img/s", goal=f">= {LATENCY_GOAL:.1f} (5 x {PAPER_V100_IMG_S})",
                        extra={"ms": 1e3 * median, "peak_mib": peak_mib(s.device)}))
    return rows


def compiled(s: Sizes, tmp: Path) -> list[Row]:
    import bench_compile

    from hiposeg import compile as hcompile

    hcompile.BACKEND = s.compile_backend
    args = Namespace(device=s.device, amp=s.amp, backbone=s.backbone, output_stride=8, batch=s.batch, size=s.crop,
                     repeats=max(s.repeats // 2, 1), warmup=s.warmup, skip_step=False, skip_inference=False)
    return [Row("compile", f"compiled / eager {r['what']}, {s.backbone} {s.crop[0]}x{s.crop[1]} {s.amp} "
                           f"(backend {s.compile_backend})",
                f"failed: fell back to eager: {r['fallback']}" if r["fallback"] else "ok", value=r["ratio"], unit="x",
                goal="< 1", extra={k: r[k] for k in ("eager_ms", "compiled_ms", "compile_s")})
            for r in bench_compile.measure(args)]


def peers(s: Sizes, tmp: Path) -> list[Row]:
    """benchmarks/bench_peers.py (hiposeg's DeepLabV3+ vs SMP's and torchvision's), run as a script at
    the suite's backbone, precision, batch and sizes; its table is kept in the row's `output`."""
    sizes = [f"{s.crop[0]}x{s.crop[1]}", f"{s.frame[0]}x{s.frame[1]}"]
    cmd = [sys.executable, str(HERE / "bench_peers.py"), "--device", s.device, "--amp", s.amp,
           "--backbone", s.backbone, "--output-stride", "8" if s.device == "cuda" else "16", "--batch", str(s.batch),
           "--size", sizes[0], "--infer-size", sizes[1], "--repeats", str(s.repeats), "--warmup", str(s.warmup)]
    if s.device == "cuda":
        cmd.append("--channels-last")
    done = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
    if done.returncode != 0:
        return [Row("peers", "bench_peers.py " + " ".join(cmd[2:]),
                    f"failed: exit code {done.returncode}: {done.stderr.strip()[-200:]}")]
    # its summary lines: "hiposeg CE training step / SMP (fastest repeats): 1.028  goal <= 1.00: NOT met"
    return [Row("peers", m[1], value=float(m[2]), unit="x", goal=m[3], extra={"command": " ".join(cmd[2:])})
            for m in re.finditer(r"^(.+?) \(fastest repeats\): ([\d.]+) +goal (.+?):", done.stdout, re.MULTILINE)]


SECTIONS: list[tuple[str, Callable[[Sizes, Path], list[Row]]]] = [
    ("cuda-tests", cuda_tests), ("step", step_ratio), ("train", real_training), ("latency", latency),
    ("compile", compiled), ("peers", peers)]


# ==========================================================================================
# Output
# ==========================================================================================


def environment(dry_run: bool) -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not dry_run else []
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": dry_run, "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpus": gpus, "cpu_threads": torch.get_num_threads(), "host": os.uname().nodename}


def markdown(env: dict[str, Any], rows: list[Row], seconds: dict[str, float]) -> str:
    head = "dry run on the CPU (tiny sizes: the numbers mean nothing)" if env["dry_run"] else ", ".join(env["gpus"])
    lines = [f"# hiposeg GPU suite: {head}", "",
             f"{env['date']}, torch {env['torch']} (CUDA {env['cuda']}); seconds per section: "
             + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), "",
             "| section | item | value | goal | status |", "|---|---|---:|---|---|"]
    for r in rows:
        value = "" if r.value is None else f"{r.value:.3f} {r.unit}".strip()
        lines.append(f"| {r.section} | {r.item} | {value} | {r.goal} | {r.status.replace('|', '/')} |")
    outputs = [r for r in rows if "output" in r.extra]
    for r in outputs:
        lines += ["", f"## {r.item}", "", "```", r.extra["output"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def publish(out: Path, env: dict[str, Any], rows: list[Row], seconds: dict[str, float]) -> None:
    from hiposeg.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / "gpu-suite.json", {"environment": env, "seconds": seconds, "rows": [asdict(r) for r in rows]})
    atomic_write_text(out / "gpu-suite.md", markdown(env, rows, seconds))


def run_suite(sizes: Sizes, out: Path, dry_run: bool, only: list[str] | None) -> list[Row]:
    from hiposeg.compile import first_line

    env, rows, seconds = environment(dry_run), [], {}
    start = time.perf_counter()
    for name, section in SECTIONS:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        print(f"=== {name} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"hiposeg-gpu-{name}-") as tmp:
            try:
                rows += section(sizes, Path(tmp))
            except Exception as e:  # noqa: BLE001 - one broken sub-benchmark must not cost the others
                rows.append(Row(name, "(section)", f"failed: {first_line(e)}"))
        seconds[name] = time.perf_counter() - t0
        print(f"=== {name}: {seconds[name]:.1f} s (total {time.perf_counter() - start:.1f} s)", flush=True)
        publish(out, env, rows, seconds)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-suite"), help="folder for gpu-suite.json and gpu-suite.md")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes (for CI)")
    p.add_argument("--only", nargs="+", choices=[n for n, _ in SECTIONS], help="run only these sections")
    args = p.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"python -m benchmarks.gpu: PyTorch {torch.__version__} sees no CUDA GPU on this machine; run it on "
              "a GPU machine, or add --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # as training runs (engine.configure_determinism)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: a thread pool costs more than it gains (as in tests/conftest.py)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run_suite(DRY if args.dry_run else GPU, args.out, args.dry_run, args.only)
    failed = [r for r in rows if r.status.startswith("failed")]
    print(f"wrote {args.out / 'gpu-suite.md'} and gpu-suite.json: {len(rows)} rows, {len(failed)} failed")
    for r in failed:
        print(f"  failed: {r.section} / {r.item}: {r.status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
