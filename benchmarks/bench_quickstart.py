"""The README's quickstart, timed as a new user meets it: `hiposeg train` in a fresh folder (it
generates the built-in synthetic set, trains 400 iterations and evaluates), and `hiposeg prepare
synthetic` alone (the generation the README quotes separately).

Each command runs in a new temporary folder, in a process of its own; reported: wall time, CPU time
(user + system of the process tree), the peak RSS of its largest process (`ru_maxrss`), and the
machine's load average before and after. Nothing else on the machine is controlled: with a load above
its core count the times are upper bounds (BENCHMARKS.md says which were measured so).

    python benchmarks/bench_quickstart.py                       # both commands, as in the README
    python benchmarks/bench_quickstart.py --only prepare        # the generation alone
    python benchmarks/bench_quickstart.py -- --iters 40         # extra `hiposeg train` flags (a shorter check)
    python benchmarks/bench_quickstart.py --smoke               # both at a toy size: checks the script, times nothing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Runs a command (argv[2:]) and writes its exit code, the peak RSS of its process tree (KiB on Linux)
# and the CPU time of the tree (user + system, s) as JSON to the file argv[1].
MEASURE = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
           "u = resource.getrusage(resource.RUSAGE_CHILDREN); open(sys.argv[1], 'w').write(json.dumps("
           "{'rc': rc, 'rss_kib': u.ru_maxrss, 'cpu_s': u.ru_utime + u.ru_stime}))")
REPO = Path(__file__).resolve().parents[1]
# --smoke: a 4 + 2 image set at 64x64 and 2 iterations on it, so the script's test takes seconds.
SMOKE_PREPARE = ["--train", "4", "--val", "2", "--size", "64", "--workers", "1"]
SMOKE_TRAIN = ["--iters", "2", "--crop", "64x64", "--batch-size", "2", "--workers", "0"]


@dataclass
class Measured:
    command: str
    seconds: float
    cpu_seconds: float
    peak_rss_gib: float
    load_before: float
    load_after: float


def measure(args: list[str], cwd: Path, log: Path) -> Measured:
    """`python -m hiposeg ARGS` in `cwd` (the worktree's hiposeg), its output to `log`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    outcome = log.with_suffix(".json")
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", MEASURE, str(outcome), sys.executable, "-m", "hiposeg", *args], cwd=cwd,
                       env=env, stderr=subprocess.STDOUT, stdout=f)
    seconds = time.perf_counter() - t0
    result = json.loads(outcome.read_text())
    if result["rc"] != 0:
        raise SystemExit(f"`hiposeg {' '.join(args)}` failed (exit {result['rc']}); its output: {log}")
    return Measured(f"hiposeg {' '.join(args)}", seconds, result["cpu_s"], result["rss_kib"] / 2**20, load_before,
                    os.getloadavg()[0])


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def report(m: Measured) -> str:
    cores = os.cpu_count() or 1
    busy = max(m.load_before, m.load_after) > cores
    return (f"{m.command}: {m.seconds:.1f} s wall ({minutes(m.seconds)}), {m.cpu_seconds:.0f} s CPU, "
            f"peak RSS {m.peak_rss_gib:.2f} GiB; "
            f"load average {m.load_before:.1f} -> {m.load_after:.1f} on {cores} cores"
            + (" (busy machine: an upper bound)" if busy else ""))


def summary(log: Path) -> str:
    """What the timed run said it did: its last progress line (speed) and its evaluations."""
    lines = log.read_text(errors="replace").splitlines()
    progress = [line for line in lines if line.startswith("iter ")][-1:]
    return "\n".join("  " + line for line in progress + [line for line in lines if line.startswith("eval @")])


def run_quickstart(tmp: Path, only: str | None, smoke: bool, train_args: list[str]) -> None:
    """Each command in a fresh folder of `tmp`, as a new user runs it; with `smoke`, train uses the
    toy set the prepare step left in its folder instead of generating the full one."""
    prepare_dir, train_dir = tmp / "prepare", tmp / ("prepare" if smoke else "train")
    if only != "train":
        prepare_dir.mkdir()
        print(report(measure(["prepare", "synthetic", *(SMOKE_PREPARE if smoke else [])], prepare_dir,
                             tmp / "prepare.log")), flush=True)
    if only != "prepare":
        train_dir.mkdir(exist_ok=True)
        print(report(measure(["train", *(SMOKE_TRAIN if smoke else []), *train_args], train_dir, tmp / "train.log")))
        print(summary(tmp / "train.log"), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("prepare", "train"), help="time one of the two commands")
    ap.add_argument("--smoke", action="store_true", help="both commands at a toy size (checks the script only)")
    ap.add_argument("train_args", nargs="*", help="extra `hiposeg train` flags, after `--`")
    args = ap.parse_args()
    if args.smoke and args.only:
        ap.error("--smoke runs both commands (its train step uses the prepare step's toy set)")
    with tempfile.TemporaryDirectory(prefix="hiposeg-quickstart-") as tmp:
        run_quickstart(Path(tmp), args.only, args.smoke, args.train_args)


if __name__ == "__main__":
    main()
