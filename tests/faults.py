"""Fault injection for the reliability suite (tests/test_reliability_*.py).

Faults are injected from OUTSIDE the production code (no test hooks in hiposeg):

* as a library, for the tests: a tiny deterministic training set, the `hiposeg train` argument
  list, starting `python -m hiposeg` in its own process group, waiting for progress, SIGKILL, and
  reading checkpoints the way a user would (`torch.load(weights_only=True)`);
* as a wrapper script, for the child processes:

      python tests/faults.py stall-write PATTERN N BYTES READY -- <hiposeg arguments>

  installs the fault, then runs `hiposeg.cli.main(<hiposeg arguments>)` exactly like the console
  script. `stall-write` makes the N-th file opened for writing whose name matches PATTERN (a glob
  on the base name, with hiposeg's `.tmp-NAME.XXXX` temp names reduced to NAME) write its first
  BYTES bytes, flush and fsync them, create the file READY and then hang, so the test can SIGKILL
  the process while that write is provably in flight. It wraps `open` and `os.fdopen`, the two
  ways Python code opens a file, so it catches the write whether or not hiposeg goes through a
  temp file: a protection that is removed cannot dodge the injection.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve()
PYTHON = sys.executable


# ==========================================================================================
# Tiny training runs (the configuration of conftest.tiny_config, through the real CLI)
# ==========================================================================================


@pytest.fixture
def one_thread():
    """In-process runs use one torch thread too (restored afterwards); see `child_env`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_data(root: Path) -> Path:
    """The built-in synthetic set at 64x64: 12 train + 4 val images (seconds to make)."""
    from hiposeg.data.synthetic import generate

    generate(root, train=12, val=4, size=64, seed=0, workers=1)
    return root


def train_args(data: Path, out: Path, *extra: str, iters: int = 8, ckpt_every: int = 2) -> list[str]:
    """`hiposeg train` on the tiny set: resnet18 OS16 at 64x64, batch 2, CPU, deterministic, a
    metrics line every iteration (the tests watch it to kill at a given iteration)."""
    return ["train", "--data", str(data), "--out", str(out), "--iters", str(iters), "--batch-size", "2",
            "--crop", "64x64", "--backbone", "resnet18", "--output-stride", "16", "--workers", "0",
            "--device", "cpu", "--deterministic", "--ckpt-every", str(ckpt_every), "--quiet",
            "--set", "model.embed_dim=32", "--set", "run.log_every=1", "--set", "run.eval_mode=whole", *extra]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per child: the same thread count in every run (bit-exact comparisons), and no
    # OpenMP oversubscription, which on a busy 2-core machine makes a step ~50x slower.
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(args: list[str], log: Path, *, inject: list[str] | None = None) -> subprocess.Popen:
    """`python -m hiposeg ARGS` (or this wrapper with a fault) in a new process group."""
    cmd = [PYTHON, str(HERE), *inject, "--", *args] if inject else [PYTHON, "-m", "hiposeg", *args]
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)


def run(args: list[str], log: Path, *, inject: list[str] | None = None, timeout: float = 300) -> int:
    proc = start(args, log, inject=inject)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise AssertionError(f"`hiposeg {' '.join(args[:1])}` did not finish in {timeout} s; log:\n{tail(log)}")


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group (the CLI and any workers) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def wait_for(cond, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    """Poll `cond()` until true; fail if the process exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited (code {proc.returncode}) before {what}; log:\n{tail(log)}")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError(f"timed out waiting for {what}; log:\n{tail(log)}")
        time.sleep(0.01)


def logged_iterations(run_dir: Path, since: int = 0) -> list[int]:
    """Training iterations logged in metrics.jsonl after byte offset `since` (complete lines only)."""
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    with open(p, "rb") as f:
        f.seek(since)
        data = f.read()
    its = []
    for line in data.split(b"\n")[:-1]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row:
            its.append(row["iter"])
    return its


def file_size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


def load_checkpoint(path: Path) -> dict[str, Any]:
    """As a user (or `--resume`) would: plain data only."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict[str, Any], b: dict[str, Any], parts=("model", "projection", "memory")) -> None:
    """Bit-exact equality of the tensors of two checkpoints."""
    import torch

    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


def temp_files(directory: Path) -> list[Path]:
    from hiposeg.atomic import TMP_PREFIX

    return sorted(p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)) if directory.is_dir() else []


# ==========================================================================================
# A file whose disk fills up: writes fail with ENOSPC once a byte budget is spent
# ==========================================================================================


class FullDiskRaw(io.RawIOBase):
    """Raw file that accepts `budget` bytes, then raises OSError(ENOSPC), like a full disk.

    Wrapped in `io.BufferedWriter` it reproduces the stack `open()` gives (buffered over raw), so
    the error reaches the writer the way a real full disk's would (e.g. inside torch.save's zip
    writer)."""

    def __init__(self, raw: io.FileIO, budget: int) -> None:
        super().__init__()
        self.raw, self.budget = raw, budget

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, *args: int) -> int:
        return self.raw.seek(*args)

    def fileno(self) -> int:
        return self.raw.fileno()

    def write(self, b) -> int:  # type: ignore[no-untyped-def, override]
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(b), self.budget)
        self.budget -= n
        return self.raw.write(memoryview(b)[:n])

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_target(f: Any) -> str:
    """The path an open file object (or a path argument) refers to."""
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    try:
        return os.readlink(f"/proc/self/fd/{f.fileno()}")
    except (OSError, AttributeError, ValueError):
        return str(getattr(f, "name", ""))


def logical_name(path: str) -> str:
    """`.tmp-last.pt.x1y2` -> `last.pt`: the file a temp file is about to become."""
    from hiposeg.atomic import TMP_PREFIX

    name = os.path.basename(path)
    if name.startswith(TMP_PREFIX):
        name = name[len(TMP_PREFIX):].rsplit(".", 1)[0]
    return name


def install_full_disk(monkeypatch, pattern: str, budget: int, nth: int = 1,
                      on_fault: Callable[[], None] | None = None, root: Path | None = None) -> dict[str, int]:
    """The disk fills up during the `nth` file opened for writing (by `open` or `os.fdopen`) whose
    logical name matches `pattern` (and, with `root`, that lies under `root`: the full disk): its writes
    fail with ENOSPC after `budget` bytes, and every later matching file fails at once (the disk stays
    full). `on_fault` runs just before the faulty file is handed out. Returns counters of matching
    files opened / made to fail."""
    real_open, real_fdopen = builtins.open, os.fdopen
    seen = {"opened": 0, "failed": 0}
    top = os.path.abspath(root) + os.sep if root is not None else ""

    def faulty(path: str, mode: str) -> int | None:
        """The byte budget if this file is one the full disk hits, else None."""
        if not (any(c in mode for c in "wax+") and fnmatch.fnmatch(logical_name(path), pattern)):
            return None
        if top and not os.path.abspath(path).startswith(top):
            return None
        seen["opened"] += 1
        if seen["opened"] < nth:
            return None
        if seen["opened"] == nth and on_fault is not None:
            on_fault()
        seen["failed"] += 1
        return budget if seen["opened"] == nth else 0

    def wrap(raw: io.FileIO, left: int, mode: str, kwargs: dict[str, Any]) -> Any:
        f = io.BufferedWriter(FullDiskRaw(raw, left))
        return f if "b" in mode else io.TextIOWrapper(f, encoding=kwargs.get("encoding") or "utf-8")

    def open_(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        left = faulty(os.fspath(file), mode) if isinstance(file, (str, os.PathLike)) else None
        if left is None:
            return real_open(file, mode, *args, **kwargs)
        return wrap(io.FileIO(file, mode.replace("b", "").replace("t", "")), left, mode, kwargs)

    def fdopen(fd, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        left = faulty(open_target_fd(fd), mode)
        if left is None:
            return real_fdopen(fd, mode, *args, **kwargs)
        return wrap(io.FileIO(fd, "w"), left, mode, kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "fdopen", fdopen)
    return seen


def open_target_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# ==========================================================================================
# A read-only (or forbidden) folder: every attempt to create or write a file under it fails
# ==========================================================================================


def install_read_only(monkeypatch, root: Path, err: int = errno.EROFS) -> None:
    """Files and folders under `root` cannot be created or opened for writing (OSError `err`), like a
    read-only mount (EROFS) or a folder of another user (EACCES): the tests run as root, for which
    permission bits stop nothing. Covers `os.open` (temp files, locks), `os.mkdir` (Path.mkdir) and
    `open` in a writing mode; reading stays possible."""
    real_os_open, real_mkdir, real_open = os.open, os.mkdir, builtins.open
    top = os.path.abspath(root)

    def under(path: Any) -> bool:
        p = os.path.abspath(os.fspath(path))
        return p == top or p.startswith(top + os.sep)

    def refuse(path: Any) -> OSError:
        return OSError(err, os.strerror(err), os.fspath(path))

    def os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if under(path) and not os.path.isdir(path):
            raise refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and under(file):
            raise refuse(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", open_)


# ==========================================================================================
# The wrapper: install a fault in this (child) process, then run the CLI
# ==========================================================================================


class StallingFile:
    """Proxy of a file opened for writing: passes `limit` bytes through, then flushes, fsyncs,
    signals `ready` and hangs (the test kills the process there)."""

    def __init__(self, f: Any, limit: int, ready: str) -> None:
        self._f, self._left, self._ready = f, limit, ready

    def write(self, data) -> int:  # type: ignore[no-untyped-def]
        n = len(data)
        if n >= self._left:
            self._f.write(memoryview(data)[: self._left] if not isinstance(data, str) else data[: self._left])
            self._f.flush()
            os.fsync(self._f.fileno())
            with builtins.open(self._ready + ".tmp", "w") as r:  # the test polls for READY: make it appear whole
                r.write(open_target(self._f))
            os.replace(self._ready + ".tmp", self._ready)
            while True:
                time.sleep(60)
        self._left -= n
        return self._f.write(data)

    def __enter__(self) -> StallingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.__exit__(*exc)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def install_stall_write(pattern: str, nth: int, limit: int, ready: str) -> None:
    real_open, real_fdopen = builtins.open, os.fdopen
    count = {"n": 0}

    def maybe_stall(f: Any, mode: str) -> Any:
        if not any(c in mode for c in "wax+") or not fnmatch.fnmatch(logical_name(open_target(f)), pattern):
            return f
        count["n"] += 1
        return StallingFile(f, limit, ready) if count["n"] == nth else f

    def open_(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        return maybe_stall(real_open(file, mode, *args, **kwargs), mode)

    def fdopen(fd, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        return maybe_stall(real_fdopen(fd, mode, *args, **kwargs), mode)

    builtins.open = open_
    io.open = open_
    os.fdopen = fdopen


def main(argv: list[str]) -> None:
    split = argv.index("--")
    fault, cli_args = argv[:split], argv[split + 1:]
    if fault[0] == "stall-write":
        pattern, nth, limit, ready = fault[1], int(fault[2]), int(fault[3]), fault[4]
        install_stall_write(pattern, nth, limit, ready)
    else:
        raise SystemExit(f"unknown fault {fault[0]!r}")
    from hiposeg.cli import main as hiposeg_main

    hiposeg_main(cli_args)


class StopAfter:
    """Stands in for `engine.StopSignal`: reports SIGINT once `n` iterations have started, so a test
    interrupts a run at an exact iteration (`monkeypatch.setattr(engine, "StopSignal", lambda: StopAfter(5))`)."""

    def __init__(self, n: int) -> None:
        self.n, self.checks = n, 0

    def __enter__(self) -> "StopAfter":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    @property
    def signum(self) -> int | None:
        self.checks += 1
        return signal.SIGINT if self.checks > self.n else None


if __name__ == "__main__":
    main(sys.argv[1:])
