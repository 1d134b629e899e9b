"""Reliability: real processes killed at random points resume to the same result.

* `hiposeg train` is SIGKILLed at three random iterations (each run resuming the previous one), then
  in the middle of a checkpoint write (a random byte offset), then stopped by SIGTERM at a random
  iteration; `--resume` finishes with
  weights and prototype memory bit-identical to an uninterrupted run, and after every kill
  `checkpoints/last.pt` is absent or a complete plain-data checkpoint.
* `hiposeg prepare` killed mid-run is tested in tests/test_prepare_resume.py.

The kill points are drawn from a seeded RNG, so a failure reproduces.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from faults import (assert_same_state, file_size, kill, load_checkpoint, logged_iterations, run, start, tail,
                    temp_files, train_args, wait_for)
from hiposeg import checkpoint
from hiposeg.errors import UserError

pytestmark = pytest.mark.slow

ITERS, CKPT_EVERY, KILLS = 20, 2, 3


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted run, through the same CLI in the same kind of process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    log = out.parent / "log.txt"
    assert run(train_args(tiny_data, out, iters=ITERS, ckpt_every=CKPT_EVERY), log) == 0, tail(log)
    return out


def sha256(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


def checkpoint_after_kill(out: Path) -> int | None:
    """After any kill: last.pt is absent or loads as plain data (never half-written). Its iteration."""
    last = out / "checkpoints" / "last.pt"
    if not last.exists():
        return None
    ck = load_checkpoint(last)
    assert ck["format"] == "hiposeg-checkpoint/1"
    return int(ck["iteration"])


def test_train_killed_at_random_points_resumes_bit_exact(tiny_data, reference, tmp_path):
    rng = random.Random(2024)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.pt"
    args = train_args(tiny_data, out, iters=ITERS, ckpt_every=CKPT_EVERY)

    # 1. SIGKILL right after a random iteration is logged, KILLS times, each run resuming the last: a
    #    kill lands in a forward/backward or in the checkpoint write that follows an even iteration.
    it1, mark = 0, 0
    for round_ in range(KILLS):
        k = rng.randint(it1 + 3, it1 + 5)  # past the next checkpoint boundary, so every round progresses
        proc = start([*args, "--resume"] if round_ else args, log)
        wait_for(lambda: max(logged_iterations(out, since=mark), default=0) >= k, proc, log, f"iteration {k}")
        kill(proc)
        logged = logged_iterations(out, since=mark)
        assert logged[0] == it1 + 1  # it resumed where the previous checkpoint left off
        got = checkpoint_after_kill(out)
        # the checkpoint before iteration it1 + 3 was complete when that iteration started; a later one may be too
        assert got is not None and got % CKPT_EVERY == 0 and it1 + 2 <= got <= max(logged), (round_, it1, got)
        it1, mark = got, file_size(out / "metrics.jsonl")

    # 2. Resume; SIGKILL while the next last.pt is being written, at a random byte offset.
    ready = tmp_path / "stalled"
    offset = int(file_size(reference / "checkpoints" / "last.pt") * rng.uniform(0.05, 0.95))
    before = sha256(last)
    mark = file_size(out / "metrics.jsonl")
    proc = start([*args, "--resume"], log, inject=["stall-write", "last.pt", "1", str(offset), str(ready)])
    wait_for(ready.exists, proc, log, "the checkpoint write to stall")
    kill(proc)
    assert logged_iterations(out, since=mark)[0] == it1 + 1  # it resumed where the checkpoint left off
    assert sha256(last) == before, "the previous checkpoint changed during an interrupted write"
    assert checkpoint_after_kill(out) == it1
    torn = temp_files(ckpt_dir)
    assert len(torn) == 1 and torn[0].stat().st_size == offset  # the write really was cut in the middle
    with pytest.raises(UserError, match="is corrupt or truncated"):  # the torn file is not a checkpoint
        checkpoint.load(torn[0])

    # 3. Resume; SIGTERM after a random later iteration: checkpoint at that boundary, exit 130.
    k3 = rng.randint(it1 + 1, ITERS - 2)  # a stop is checked before each iteration: not after the last
    mark = file_size(out / "metrics.jsonl")
    proc = start([*args, "--resume"], log)
    wait_for(lambda: max(logged_iterations(out, since=mark), default=0) >= k3, proc, log, f"iteration {k3}")
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, tail(log)
    said = "".join(tail(log).split())  # whitespace-free: the console may wrap a long path
    assert "".join(f"resume with `hiposeg train --resume --out {out}`".split()) in said, tail(log)
    assert not temp_files(ckpt_dir), "a stale temp file survived the resume"
    stopped = json.loads((out / "status.json").read_text())
    assert stopped["state"] == "interrupted" and checkpoint_after_kill(out) == stopped["iteration"] >= k3

    # 4. Resume to the end: the same weights, BN statistics and prototype memory as without faults.
    assert run([*args, "--resume"], log) == 0, tail(log)
    a, b = load_checkpoint(reference / "checkpoints" / "last.pt"), load_checkpoint(last)
    assert a["iteration"] == b["iteration"] == ITERS
    assert_same_state(a, b)
    momentum = [(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
                for k in a["optimizer"]["state"]]
    assert momentum and all(torch.equal(x, y) for x, y in momentum)  # the optimizer resumed exactly too
    ref_report = json.loads((reference / "report.json").read_text())
    assert json.loads((out / "report.json").read_text())["levels"] == ref_report["levels"]
    assert not temp_files(ckpt_dir)


def test_sigterm_to_the_parent_of_a_multi_process_run_stops_every_worker_cleanly(tiny_data, tmp_path):
    """`--gpus 2 --device cpu`: SIGTERM to the launching process only (what a container runtime sends
    to PID 1) is forwarded to both workers; they agree on the iteration, checkpoint once and the
    command exits 130 with the resume line; `--resume` then finishes with identical ranks."""
    out, log = tmp_path / "ddp", tmp_path / "log.txt"
    args = train_args(tiny_data, out, "--batch-size", "4", "--gpus", "2", iters=12, ckpt_every=100)  # 2 per rank
    k = random.Random(11).randint(3, 6)
    proc = start(args, log)
    wait_for(lambda: max(logged_iterations(out), default=0) >= k, proc, log, f"iteration {k}")
    os.kill(proc.pid, signal.SIGTERM)  # the parent alone, not the process group
    assert proc.wait(timeout=120) == 130, tail(log)
    said = "".join(tail(log).split())
    assert "".join(f"resume with `hiposeg train --resume --out {out}`".split()) in said, tail(log)
    stopped = json.loads((out / "status.json").read_text())
    assert stopped["state"] == "interrupted" and k <= stopped["iteration"] < 12
    assert checkpoint_after_kill(out) == stopped["iteration"]  # written at the stop, not by --ckpt-every
    assert run([*args, "--resume"], log) == 0, tail(log)
    done = json.loads((out / "status.json").read_text())
    assert done["state"] == "finished" and done["iteration"] == 12
    assert len(done["rank_digests"]) == 2 and done["rank_digests"][0] == done["rank_digests"][1]
