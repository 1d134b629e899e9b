"""The worker pool and progress bar that `prepare` and the synthetic set convert files with.

Why a module of its own: both need the same things from a pool, which `concurrent.futures` does not
give by itself: a bounded window of tasks in flight (so a run can stop soon after a bad file, with
the files in flight finished and journaled), a clear UserError when a worker dies (killed, out of
memory), the fastest safe start method, and one worker per usable core.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from hiposeg.errors import UserError


class WorkerPool:
    """`imap_unordered` over a process pool (or in-process for workers=1).

    Keeps at most `window` tasks in flight, so `stop()` (e.g. after a bad file) lets the tasks
    already running finish and submits no more. A worker that dies (killed, out of memory)
    raises UserError: the finished items are journaled, so rerunning resumes.
    """

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> None:
        self.workers = max(1, workers)
        self.initializer, self.initargs = initializer, initargs
        self._stopping = False
        self._executor: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        if self.workers > 1:
            self._executor = cf.ProcessPoolExecutor(self.workers, mp_context=_mp_context(self.initializer.__module__),
                                                    initializer=self.initializer, initargs=self.initargs)
            self._executor.submit(int).result()  # start the workers now, before any progress-bar thread
        else:
            self.initializer(*self.initargs)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        self._stopping = True

    def imap_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        if self._executor is None:
            for t in tasks:
                if self._stopping:
                    return
                yield fn(t)
            return
        it = iter(tasks)
        pending: set[cf.Future] = set()
        window = 4 * self.workers
        try:
            while True:
                while not self._stopping and len(pending) < window:
                    t = next(it, None)
                    if t is None:
                        break
                    pending.add(self._executor.submit(fn, t))
                if not pending:
                    return
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        except cf.process.BrokenProcessPool:
            raise UserError("a worker process died unexpectedly (killed, or out of memory); the files finished so "
                            "far are kept",
                            hint="Rerun the same command to resume, with fewer --workers if memory is short.") from None
        finally:
            for fut in pending:
                fut.cancel()


def _mp_context(preload: str) -> multiprocessing.context.BaseContext:
    """fork starts a pool in ~0.03 s (the workers inherit the imported modules) and is safe while
    this process runs no other thread; otherwise forkserver (~0.5 s: workers start clean), with
    the module of the workers' code (`preload`) imported once in the server."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([preload])
        return ctx
    return multiprocessing.get_context("spawn")


def default_workers() -> int:
    """One worker per core this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def progress_bar(quiet: bool):  # type: ignore[no-untyped-def]
    """The progress bar on stderr (stdout stays for the summary); `quiet` hides it."""
    from hiposeg.progress import work_progress

    return work_progress(unit="img", disable=quiet)
