"""Process groups for multi-GPU (and multi-process CPU) training, and stopping on a signal.

Two ways in, one code path:
* `torchrun --nproc_per_node=N -m hiposeg train ...` sets RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT; `init_from_env` joins that group (several machines work the same way).
* `hiposeg train --gpus N` calls `spawn(N, fn, ...)`, which starts N local worker processes with
  those same variables set, then each joins like under torchrun.
The backend is NCCL on CUDA and gloo on the CPU (`--device cpu`), so CI exercises the same DDP path
without a GPU. Every helper here is the identity (or a no-op) in a single process.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import hashlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hiposeg.atomic import atomic_write_json
from hiposeg.errors import UserError
from hiposeg.safeload import load_json


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# How long the processes of a group wait for each other to start (a leftover RANK/WORLD_SIZE would
# otherwise wait for ranks that never come); collectives of a formed group may take far longer.
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
ENV_HINT = ("To train in one process, unset them (`unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT`); for "
            "several, launch with `torchrun --nproc_per_node=N -m hiposeg train ...` or use `hiposeg train --gpus N`.")


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_VARIABLES)


def torchrun_variables() -> str:
    """`RANK=0, WORLD_SIZE=2, LOCAL_RANK=0` as set in the environment, for messages."""
    return ", ".join(f"{k}={os.environ.get(k, '')}" for k in TORCHRUN_VARIABLES)


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun variables, checked: integers, a rank inside
    the world, and for a group of several the MASTER_ADDR / MASTER_PORT it meets at. Variables left
    over in a shell (set by hand or by an earlier torchrun) are a UserError naming them and the fix."""
    try:
        rank, world, local = (int(os.environ[k]) for k in TORCHRUN_VARIABLES)
    except ValueError:
        raise UserError(f"{torchrun_variables()}: these torchrun variables must be integers", hint=ENV_HINT) from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise UserError(f"{torchrun_variables()}: RANK must lie in 0..WORLD_SIZE-1 (and LOCAL_RANK be >= 0)",
                        hint=ENV_HINT)
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise UserError(f"{torchrun_variables()} are set, as torchrun sets them, but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not: no torchrun group can be formed",
                            hint=ENV_HINT)
        port = os.environ["MASTER_PORT"]
        if not (port.isdigit() and 0 < int(port) < 2**16):
            raise UserError(f"MASTER_PORT={port!r} (with {torchrun_variables()}) is not a port number (1..65535)",
                            hint=ENV_HINT)
    return rank, world, local


def launch_of(gpus: int) -> tuple[int, str]:
    """(world size, launcher) of a run asked for `gpus` processes: torchrun's group if this process is
    one of its ranks, else `gpus` processes spawned here (`spawn`), or this one (`single`)."""
    if launched_by_torchrun():
        return torchrun_env()[1], "torchrun"  # checked: leftover variables are named with the fix
    return gpus, "spawn" if gpus > 1 else "single"


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "cuda":
        raise UserError("--device cuda was requested but PyTorch sees no CUDA GPU on this machine",
                        hint="Use --device cpu (or --device auto), or install a CUDA build of PyTorch.")
    return torch.device("cpu")


def check_world(world_size: int, device: str) -> None:
    """Fail early, with the fix, when N processes cannot get N GPUs."""
    if world_size <= 1 or device == "cpu":
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise UserError(f"--gpus {world_size} needs {world_size} GPUs, but PyTorch sees none",
                        hint=f"To run {world_size} processes on the CPU (gloo backend), add --device cpu.")
    if launched_by_torchrun():
        return
    if n < world_size:
        raise UserError(f"--gpus {world_size} needs {world_size} GPUs, but PyTorch sees {n}",
                        hint=f"Use --gpus {n} or fewer (CUDA_VISIBLE_DEVICES selects which).")


def init_from_env(device_pref: str) -> DistEnv:
    """Join the process group described by the torchrun environment variables (if any)."""
    if not launched_by_torchrun():
        return DistEnv(device=pick_device(device_pref))
    rank, world, local = torchrun_env()
    device = pick_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, store=rendezvous(rank, world), rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT, **({"device_id": device} if device.type == "cuda" else {}))
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def rendezvous(rank: int, world: int) -> dist.Store:
    """The group's store, as `init_process_group("env://")` makes it (torch's env:// rendezvous, the
    same prefix), but with a bounded wait for the other ranks: RENDEZVOUS_TIMEOUT, then a UserError."""
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=RENDEZVOUS_TIMEOUT))
    except (RuntimeError, ValueError) as e:  # DistStoreError / DistNetworkError (timeout, refused), a bad port
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise UserError(f"{torchrun_variables()} are set, but the {world} processes of that group did not meet at "
                        f"{where} within {int(RENDEZVOUS_TIMEOUT.total_seconds())} s "
                        f"({str(e).strip().splitlines()[0][:160]})", hint=ENV_HINT) from None
    store.set_timeout(COLLECTIVE_TIMEOUT)
    return dist.PrefixStore("default_pg", store)


def share_cpu_cores(env: DistEnv) -> None:
    """N CPU processes share the cores instead of each starting one thread per core (unless
    OMP_NUM_THREADS says how many)."""
    if env.distributed and env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def shutdown(together: bool = False) -> None:
    """Leave the process group. `together`: every rank is known to reach this point, so first wait for
    the others (a barrier): a gloo rank that tears its connections down while a peer is still working
    can make that peer's transport thread throw "Connection closed by peer" and abort the process
    (SIGABRT), a known gloo race at exit. Error paths pass False: a failed peer may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(local_rank: int, world_size: int, port: int, parent: int, fn: Callable[..., Any],
                 args: tuple) -> None:
    die_with_parent(parent)
    # A worker killed by a fatal signal (SIGSEGV, SIGABRT from native code) prints every thread's Python
    # stack to stderr: the launcher only learns "process N terminated with signal ...".
    faulthandler.enable(all_threads=True)
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)
    leave_without_finalization()


def leave_without_finalization() -> None:
    """End a finished spawned worker as a forked one ends: `os._exit(0)`, without interpreter finalization.
    Everything the run writes is closed and renamed into place by then; what finalization adds is the
    teardown of native libraries, where a thread object destroyed while still running aborts the process
    ("terminate called without an active exception", SIGABRT) and turns a complete run into a failed
    one. Collect first, so this run's finalisers (the data loader's worker shutdown) still run, and
    flush what is buffered for the terminal."""
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream must not turn success into failure
            stream.flush()
    os._exit(0)


def spawn(world_size: int, fn: Callable[..., Any], args: tuple = ()) -> None:
    """Run `fn(*args)` in `world_size` local processes that see torchrun-style variables.

    SIGINT/SIGTERM sent to this (parent) process are forwarded to the workers, which checkpoint and
    exit at the next iteration boundary; the parent waits for them instead of dying first. A
    scheduler that signals only the main PID (e.g. a container runtime) thus stops a run cleanly;
    a signal to the whole process group (Ctrl-C, Slurm) reaches the workers twice, which is harmless.
    If the parent is killed outright (SIGKILL), the workers die with it (`die_with_parent`): the parent
    holds the run directory's lock, so no worker may write there once it is gone.
    """
    given = os.environ.get("MASTER_PORT", "")
    port = int(given) if given.isdigit() and 0 < int(given) < 2**16 else free_port()
    context = mp.start_processes(_spawn_entry, args=(world_size, port, os.getpid(), fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")

    def forward(signum: int, frame: Any) -> None:
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not context.join():
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def spawn_reporting(world_size: int, fn: Callable[..., Any], args: tuple, error_file: Path) -> None:
    """`spawn`, and a worker's UserError raised here as that UserError (rank 0 leaves it in
    `error_file`); any other failure of a worker is a RuntimeError."""
    error_file.unlink(missing_ok=True)
    try:
        spawn(world_size, _recording_user_errors, (fn, args, error_file))
    except Exception as e:
        if error_file.exists():
            info = load_json(error_file.read_bytes(), str(error_file))
            raise UserError(info["message"], hint=info.get("hint")) from None
        raise RuntimeError(f"a training process failed: {e}") from e


def _recording_user_errors(fn: Callable[..., Any], args: tuple, error_file: Path) -> None:
    try:
        fn(*args)
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            atomic_write_json(error_file, {"message": e.message, "hint": e.hint})
        raise


def decided_on_rank0(env: DistEnv, decide: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """Run `decide()` on global rank 0 only: it returns (what rank 0 keeps, what every rank gets).
    Returns that pair on rank 0 and (None, the shared part) elsewhere. A UserError on rank 0 is raised
    on every rank, so a refusal ends every rank at once instead of leaving them waiting."""
    kept: Any = None
    outcome: tuple[str, Any, str | None] = ("ok", None, None)
    if env.is_main:
        try:
            kept, shared = decide()
            outcome = ("ok", shared, None)
        except UserError as e:
            outcome = ("error", e.message, e.hint)
        except BaseException as e:
            broadcast_object(("bug", f"rank 0 failed to start the run: {type(e).__name__}: {e}", None))
            shutdown(together=True)  # every rank leaves through the `outcome` branch below
            raise
    outcome = broadcast_object(outcome)
    if outcome[0] != "ok":
        shutdown(together=True)
        if outcome[0] == "bug":
            raise RuntimeError(outcome[1])
        raise UserError(outcome[1], hint=outcome[2])
    return kept, outcome[1]


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux `PR_SET_PDEATHSIG`; a no-op
    elsewhere), and die now if the parent is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (agreement for stop requests)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_buffers_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BN running statistics) to every rank. Without SyncBN each rank's
    last forward leaves its own statistics, so this runs before evaluating or saving."""
    if dist.is_available() and dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def world_size() -> int:
    """The number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverRanks(torch.autograd.Function):
    """Differentiable SUM all-reduce. Every rank's loss depends on every rank's input through the
    global sum, so the backward is also a sum over ranks. The same as torch.distributed.nn.functional.
    all_reduce, which current torch deprecates with a FutureWarning on every call."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(x: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """The sum of `x` over all ranks (`x` itself in a single process); `differentiable` lets the
    gradient flow back to every rank's input."""
    if world_size() == 1:
        return x
    if differentiable:
        return _SumOverRanks.apply(x)
    out = x.clone()
    dist.all_reduce(out)
    return out


def rank_digests(*modules: torch.nn.Module) -> list[str]:
    """The state digest of every rank (one entry when not distributed): DDP must keep them equal."""
    mine = state_digest(*modules)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, mine)
    return box


def state_digest(*modules: torch.nn.Module) -> str:
    """sha256 over every tensor of the modules' state dicts (weights, BN buffers, prototype memory)."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StopSignal:
    """SIGINT/SIGTERM set a flag; the training loop checkpoints at the next iteration boundary and stops."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
