"""Atomic file writes: a temp file in the same directory, fsync, then rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
half-written file, even if the process is killed or the disk fills mid-write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from hiposeg.errors import UserError

TMP_PREFIX = ".tmp-"
# A file NAME is written as `.tmp-NAME.XXXXXXXX` first (mkstemp's 8 random characters; image links use
# the pid, at most 7 digits): that name must fit the file system's limit too.
TEMP_NAME_EXTRA = len(TMP_PREFIX) + 1 + 8
NAME_MAX = 255  # bytes in one file name on Linux file systems (ext4, XFS, Btrfs, tmpfs, NFS)
WRITE_PROBE = "write-test"  # the logical name of check_writable's probe file (`.tmp-write-test.XXXX`)
# hiposeg's temp names: `atomic_open` (mkstemp: 8 random characters) and prepare's image links (the pid)
# append a dot and a tag to `.tmp-NAME`. Only files of this pattern are ever removed as stale temps.
OWN_TEMP = re.compile(re.escape(TMP_PREFIX) + r".+\.(?:[a-z0-9_]{8}|\d+)$")


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
    """Delete temp files left by a killed writer in `directory` (not recursive): regular files named by
    hiposeg's temp-name pattern only (`OWN_TEMP`), never a user's `.tmp-notes` or a link. Returns the count."""
    n = 0
    d = Path(directory)
    if not d.is_dir() or d.is_symlink():
        return 0
    for e in os.scandir(d):
        if OWN_TEMP.match(e.name) and e.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(e.path)
                n += 1
    return n


# ---- files hiposeg keeps open for writing, and its own folders ---------------------------------


def open_log(path: str | os.PathLike, *, append: bool, what: str = "output folder") -> IO[str]:
    """Open a log hiposeg appends to (e.g. metrics.jsonl) for writing: never through a symbolic link
    (O_NOFOLLOW), never into a hard-linked file or a pipe (checked on the open descriptor, before
    anything is truncated or written), so no other file's content can change. `append=False` starts it empty."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # a link; a FIFO nobody reads
            kind = "a symbolic link" if e.errno == errno.ELOOP else "a named pipe (FIFO)"
            raise link_refusal(path, kind, what) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise link_refusal(path, "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file",
                           what)
    os.set_blocking(fd, True)
    if not append:
        os.ftruncate(fd, 0)
    return os.fdopen(fd, "a", encoding="utf-8")


def refuse_links(root: Path, names: Iterable[str], what: str) -> None:
    """hiposeg writes the entries `names` (relative paths) inside its folder `root`: none of them, nor
    a folder on the way to it, may be a symbolic link (the writes would land where it points) or a
    hard-linked file (they would change the other name's content too). Checked before the work."""
    for name in names:
        p = root
        for part in Path(name).parts:
            p = p / part
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                break
            if stat.S_ISLNK(st.st_mode):
                raise link_refusal(p, f"a symbolic link (to {os.readlink(p)})", what)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                raise link_refusal(p, "a hard link to another file", what)


def link_refusal(path: Path, kind: str, what: str = "output folder") -> UserError:
    return UserError(f"{path} is {kind}: hiposeg never writes through a link, nor into a file it did not create, "
                     f"in its {what}",
                     hint=f"Remove {path.name} (hiposeg writes its own there), or choose another --out.")


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
