"""One owner per output directory: a run directory or a prepared dataset is written by one hiposeg
process (group) at a time.

The lock is an exclusive `flock` on `DIR/.hiposeg.lock`, held by an open file for as long as the
owner lives. The kernel drops it when the owner exits or is killed, so a lock left by a killed run is
recognised as stale by construction: the next process simply gets it. The file itself stays (removing
it would let a third process lock a fresh file while a second still holds the old one); it records who
holds the lock (pid, host, command, start time) for the message the second process shows.

Locks are advisory and local to one machine's kernel (on some network filesystems `flock` is not
shared between hosts): they stop the accidents of one user on one machine, not a hostile one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from hiposeg.errors import UserError

LOCK_NAME = ".hiposeg.lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_held_in_child() -> None:
    """A forked child (a worker pool, a DataLoader worker) inherits the lock's descriptor and would keep
    the lock taken after its parent is killed: it closes its copies (which does not release the lock:
    the parent's descriptor still holds it)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class DirectoryLock:
    """`with DirectoryLock(path, "run directory"):` — or `acquire()` / `release()` by hand."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._pid = os.getpid()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirectoryLock:
        """Take the lock (creating the directory if needed); UserError naming the holder if taken."""
        if self._fd is not None:
            return self
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)  # never write through a link
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"cannot use {self.what} {self.directory}: its lock file {self.path} is a symbolic "
                                "link, and hiposeg never writes through one", hint="Remove the link.") from None
            raise UserError(f"cannot use {self.what} {self.directory}: {e.strerror or e}",
                            hint="Choose a folder you can write to.") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(fd)  # a hard link or a special file: writing the record would change another file
            kind = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise UserError(f"cannot use {self.what} {self.directory}: its lock file {self.path} is {kind}, and "
                            "hiposeg never writes into a file it did not create", hint="Remove it.")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"cannot lock {self.what} {self.directory}: {e.strerror or e}") from None
            raise UserError(f"{self.what} {self.directory} is in use by another hiposeg process{describe(holder)}",
                            hint="Wait for it to finish (or stop it), or choose another output folder.") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}
        with contextlib.suppress(OSError):  # the record is for messages only; a full disk must not block
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd, self._pid = fd, os.getpid()
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.getpid() != self._pid:  # a forked copy of the owner: its descriptor was closed at the fork
            return
        _HELD.discard(fd)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError, RecursionError):  # the record is for messages only: never fail on it
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("pid", "host", "started", "command") if isinstance(data.get(k), (str, int))}


def describe(holder: dict[str, Any]) -> str:
    """' (pid 123 on host, started ..., `hiposeg train ...`)' from a lock record, or ''."""
    parts = []
    if holder.get("pid"):
        parts.append(f"pid {holder['pid']}" + (f" on {holder['host']}" if holder.get("host") else ""))
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    if holder.get("command"):
        parts.append(f"`{holder['command']}`")
    return f" ({', '.join(parts)})" if parts else ""
