"""Atomic file writes: a temp file in the same directory, fsync, then rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
half-written file, even if the process is killed or the disk fills mid-write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from hiposeg.errors import UserError

TMP_PREFIX = ".tmp-"
# A file NAME is written as `.tmp-NAME.XXXXXXXX` first (mkstemp's 8 random characters; image links use
# the pid, at most 7 digits): that name must fit the file system's limit too.
TEMP_NAME_EXTRA = len(TMP_PREFIX) + 1 + 8
NAME_MAX = 255  # bytes in one file name on Linux file systems (ext4, XFS, Btrfs, tmpfs, NFS)
WRITE_PROBE = "write-test"  # the logical name of check_writable's probe file (`.tmp-write-test.XXXX`)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; shared datasets need the usual mode
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() names no file: name the one being written
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save(path: str | os.PathLike, writer: Callable[[IO[bytes]], None]) -> None:
    """Run `writer(file)` on a temp file and rename it into place (e.g. for `torch.save`)."""
    with atomic_open(path, "wb") as f:
        writer(f)


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Delete temp files left by a killed writer in `directory` (not recursive). Returns the count."""
    n = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    for p in d.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n


# ---- output paths, checked before the long work ------------------------------------------------


def check_writable(directory: str | os.PathLike, what: str) -> None:
    """Create `directory` if needed, then write, fsync and delete a small temp file in it.

    A read-only, full or forbidden output then fails in a second with a message naming it, before
    hours of training or evaluation whose results it would lose (permission bits alone would not
    tell: root ignores them, and a full disk accepts new empty files)."""
    d = Path(directory)
    blocker = file_in_the_way(d)
    if blocker is not None:
        raise UserError(f"{what} {d} cannot be created: {blocker} is a file, not a folder",
                        hint="Choose another path (a folder, or a new name to create).")
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{WRITE_PROBE}.", dir=d)
    except OSError as e:
        raise UserError(f"cannot write to {what} {d}: {e.strerror or e}",
                        hint="Choose a folder you can write to (and with free space).") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"hiposeg write test\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write to {what} {d}: {e.strerror or e}",
                        hint="Free disk space, or choose a folder you can write to.") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def file_in_the_way(path: Path) -> Path | None:
    """`path` itself, or its nearest existing ancestor, when that is not a folder (so the folder
    `path` can neither be used nor created)."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_empty_folder(directory: Path, what: str, *, overwrite: bool) -> None:
    """An output folder must be new or empty unless the user asked (`--overwrite`) to write over
    files of the same names in it: a folder of someone else's files is never written into by accident."""
    blocker = file_in_the_way(directory)
    if blocker is not None:
        raise UserError(f"{what} {directory} cannot be created: {blocker} is a file, not a folder",
                        hint="Choose another path (a folder, or a new name to create).")
    if overwrite or not directory.is_dir():
        return
    entries = sorted(p.name for p in directory.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"{what} {directory} is not empty ({len(entries)} {'entry' if len(entries) == 1 else 'entries'}: "
                        f"{shown})",
                        hint="Choose a new or empty folder, or add --overwrite to replace files of the same names "
                             "in it (other files are left alone).")


def name_too_long_fix(e: OSError) -> str | None:
    """The fix for a write that failed because a file name (or the whole path) is too long for the
    file system, else None: freeing space or rerunning cannot help there."""
    if e.errno != errno.ENAMETOOLONG:
        return None
    return (f"A file name may hold at most {NAME_MAX} bytes, and hiposeg writes each file through a temp name "
            f"{TEMP_NAME_EXTRA} bytes longer: rename the input file (shorter), or choose an output folder with a "
            "shorter path")


def write_failure(e: OSError, path: str | os.PathLike | None = None) -> str:
    """`FILE: reason` for a failed write (the file from the error, else `path`)."""
    return f"{e.filename or path}: {e.strerror or e}"
