"""The output folder (--out): whose it is, what hiposeg wrote there, and how a failed write is reported.

Why: `prepare` and the synthetic set must never write into, or remove from, a folder that is not
theirs. A folder is hiposeg's only if it holds a hiposeg manifest or journal; `--overwrite` then
removes only the files those record (or, for the synthetic set, the files of its naming scheme),
never anything else a user put there, and never writes through a link that leads outside --out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hiposeg.atomic import OWN_TEMP, TMP_PREFIX, name_too_long_fix
from hiposeg.data.journal import Journal
from hiposeg.data.layout import (HIERARCHY_NAME, JOURNAL_NAME, MANIFEST_NAME, folder_inside, is_plain_name,
                                 split_dirs)
from hiposeg.data.manifest import read_own_manifest
from hiposeg.errors import UserError
from hiposeg.lock import LOCK_NAME

OWN_FILES = (JOURNAL_NAME, MANIFEST_NAME, HIERARCHY_NAME)
SYNTHETIC_STEM = re.compile(r"^synthetic_(?P<split>.+)_\d{5,}\.png$")  # synthetic.stem_of + ".png"



@dataclass
class OutputFolder:
    """What --out holds, read without writing anything."""

    path: Path
    entries: list[str]  # its entries except hiposeg's lock and temp files
    manifest: dict[str, Any] | None  # a hiposeg manifest
    manifest_problem: str | None  # why manifest.json (when present) is not one
    journal_header: dict[str, Any] | None
    records: dict[tuple[str, str], dict[str, Any]]

    @property
    def owned(self) -> bool:
        return self.manifest is not None or self.journal_header is not None

    @property
    def source(self) -> str | None:
        """The source that made the dataset (the manifest's, else the journal's)."""
        made_by = self.manifest or self.journal_header or {}
        return made_by.get("source")

    @property
    def splits(self) -> set[str]:
        return set(self.manifest["splits"] if self.manifest else ()) | {s for s, _ in self.records}


def inspect_output(out: Path, *, strict: bool = True) -> OutputFolder:
    """The state of `out` (see OutputFolder); `strict`: as in `Journal.read`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder", hint="Choose another --out.")
    try:
        entries = sorted(e for e in os.listdir(out) if not is_scratch(e)) if out.is_dir() else []
    except OSError as e:
        raise UserError(f"cannot list --out {out}: {e.strerror or e}", hint="Choose a folder you can read.") from None
    manifest, problem = read_own_manifest(out / MANIFEST_NAME)
    header, records = Journal.read(out / JOURNAL_NAME, strict=strict)
    return OutputFolder(out, entries, manifest, problem, header, records)


def is_scratch(name: str) -> bool:
    """hiposeg's lock file and the temp files of its own top-level files (a run killed mid-write)."""
    if name == LOCK_NAME:
        return True
    return bool(OWN_TEMP.match(name)) and any(name[len(TMP_PREFIX):].startswith(f + ".") for f in OWN_FILES)


def check_may_write(state: OutputFolder, suggestion: str) -> None:
    """Refuse a non-empty folder that is not provably hiposeg's, even with --overwrite."""
    if not state.entries or state.owned:
        return
    reasons = [state.manifest_problem] if state.manifest_problem else []
    if (state.path / JOURNAL_NAME).exists() and state.journal_header is None:
        reasons.append(f"{state.path / JOURNAL_NAME}: no hiposeg journal header")
    why = f" ({'; '.join(reasons)})" if reasons else ""
    shown = ", ".join(state.entries[:5]) + (f", ... ({len(state.entries)} entries)" if len(state.entries) > 5 else "")
    raise UserError(f"--out {state.path} is not empty and holds no hiposeg prepared dataset{why}; refusing to write "
                    f"into it, even with --overwrite (it holds: {shown})",
                    hint=f"Choose an empty or new folder, e.g. --out {suggestion}.")


def recorded_outputs(out: Path, rec: dict[str, Any]) -> list[Path]:
    """The files a journal record says hiposeg wrote (none for a file skipped as bad)."""
    if "skipped" in rec:
        return []
    base = out / rec["split"]
    files = [base / "fine" / f"{rec['stem']}.png", base / "coarse" / f"{rec['stem']}.png"]
    name = recorded_image_name(rec)
    return files + [base / "images" / name] if name else files


def recorded_image_name(rec: dict[str, Any]) -> str | None:
    """The output image's file name: recorded, or (records written before it was) the stem plus the
    suffix of the link's target; None when unknown (such a record of a copied image)."""
    kind, value = rec["image"]
    name = rec.get("image_name") or (rec["stem"] + os.path.splitext(value)[1] if kind == "link" else None)
    return name if is_plain_name(name) and os.path.splitext(name)[0] == rec["stem"] else None


def synthetic_outputs(out: Path, splits: Iterable[str]) -> list[Path]:
    """The files of the synthetic set's naming scheme (`synthetic_{split}_{index}.png`) in its split folders."""
    files = []
    for split in splits:
        for d in split_dirs(out, [split]):
            with contextlib.suppress(OSError):
                files += [d / n for n in os.listdir(d) if (m := SYNTHETIC_STEM.match(n)) and m["split"] == split]
    return files


def remove_own_file(out: Path, path: Path) -> None:
    """Unlink a file hiposeg wrote (a symlink: the link only) if it lies inside `out` and is not a folder."""
    if not folder_inside(out, path.parent):
        return
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)


def clear_prepared(state: OutputFolder, header: dict[str, Any]) -> list[str]:
    """--overwrite: remove what hiposeg wrote in `state.path` and start a new journal with `header`.

    Removed: the manifest (first: a half-cleared folder is never taken for a finished dataset), the
    outputs the journal records (the synthetic set's by their names), temp files, hierarchy.json and
    the split folders this leaves empty. The caller then starts the new journal: the old one stays
    until then (or, when there is none, `header` starts one first), so the folder is recognisably
    hiposeg's throughout. Returns the files kept (relative paths): those hiposeg did not write."""
    out = state.path
    synthetic = state.source == "synthetic"
    if state.journal_header is None and not synthetic:
        raise UserError(f"{out} holds a prepared dataset without its journal ({JOURNAL_NAME}), so hiposeg cannot "
                        "tell which of the files there it wrote; it removes nothing",
                        hint=f"Remove {out} yourself (keep what you need from it), or choose another --out.")
    if state.journal_header is None:
        Journal.create(out / JOURNAL_NAME, header)
    remove_own_file(out, out / MANIFEST_NAME)
    for rec in state.records.values():
        for path in recorded_outputs(out, rec):
            remove_own_file(out, path)
    splits = state.splits | ({"train", "val"} if synthetic else set())
    for path in synthetic_outputs(out, splits) if synthetic else []:
        remove_own_file(out, path)
    for d in split_dirs(out, splits):
        if folder_inside(out, d):
            remove_temp_files(d)
    remove_own_file(out, out / HIERARCHY_NAME)
    remove_emptysplit_dirs(out, splits)
    return user_files(out)


def check_split_dirs_inside(out: Path, splits: Iterable[str]) -> None:
    """Outputs are written only inside `out`: a split folder (or images/fine/coarse folder) that is a
    symlink leading elsewhere would make hiposeg write over files outside it."""
    for split in splits:
        for d in [out / split, *split_dirs(out, [split])]:
            if d.exists() and not folder_inside(out, d):
                raise UserError(f"{d} leads outside --out {out} (to {os.path.realpath(d)}); hiposeg writes only "
                                "inside --out", hint="Remove that link, or choose another --out.")


def remove_emptysplit_dirs(out: Path, splits: Iterable[str]) -> None:
    """rmdir the images/fine/coarse folders and split folders that are empty (never a symlink's target)."""
    for split in splits:
        for d in [*split_dirs(out, [split]), out / split]:
            if not d.is_symlink() and folder_inside(out, d):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty


def user_files(out: Path) -> list[str]:
    """Files under `out` that are not hiposeg's bookkeeping (symlinked folders are not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        found += [os.path.normpath(os.path.join(rel, n)) for n in filenames
                  if rel != "." or n not in (LOCK_NAME, JOURNAL_NAME)]
        found += [os.path.normpath(os.path.join(rel, n)) for n in dirnames if os.path.islink(os.path.join(dirpath, n))]
    return sorted(found)


def kept_note(out: Path, kept: list[str]) -> list[str]:
    """The summary line for files --overwrite left in place."""
    if not kept:
        return []
    shown = ", ".join(kept[:5]) + (f", ... ({len(kept)} in all)" if len(kept) > 5 else "")
    return [f"--overwrite kept {len(kept)} file(s) in {out} that hiposeg did not write: {shown}"]


def remove_scratch(out: Path) -> None:
    """Temp files of hiposeg's top-level files left by a killed run (the lock file stays)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(out):
            if name != LOCK_NAME and is_scratch(name):
                remove_own_file(out, out / name)


def check_out_not_in_raw(raw: Path, out: Path) -> None:
    r, o = raw.resolve(), out.resolve()
    if o == r or r in o.parents:
        raise UserError(f"--out {out} is inside the raw release {raw}; hiposeg never writes under RAW",
                        hint="Choose an output folder outside RAW (the default is data/DATASET).")
    if o in r.parents:
        raise UserError(f"the raw release {raw} is inside --out {out}; preparing (or --overwrite) there could "
                        "touch the raw files", hint="Choose an --out folder that does not contain RAW.")


def remove_temp_files(directory: Path) -> int:
    """Remove temp files (and temp symlinks) left by writes in flight when a run was killed: only
    names of hiposeg's temp-name pattern, never a folder."""
    n = 0
    if directory.is_dir():
        for e in os.scandir(directory):
            if OWN_TEMP.match(e.name) and not e.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                    n += 1
    return n


@contextlib.contextmanager
def output_errors(out: Path, resume_hint: str) -> Iterator[None]:
    """An OSError while writing under --out (read-only, full, permissions) as one UserError naming
    the file and the fix; writes are atomic, so nothing partial is left."""
    try:
        yield
    except OSError as e:
        raise write_error(e, out, resume_hint) from None


def write_error(e: OSError, out: Path, command: str, done: int | None = None) -> UserError:
    """The UserError for a failed write under `out`, with a fix that fits the cause."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free disk space (or choose an --out on another disk)"
    elif e.errno == errno.EROFS:
        fix = f"{out} is on a read-only file system: choose an --out on a writable disk"
    elif e.errno in (errno.EACCES, errno.EPERM):
        fix = f"Make {out} writable for you, or choose another --out"
    elif e.errno == errno.ENAMETOOLONG:
        fix = name_too_long_fix(e)
    else:
        fix = "Fix the cause, or choose another --out"
    kept = f"The {done} files finished so far are kept" if done is not None else "Finished files are kept"
    return UserError(f"cannot write {e.filename or out}: {e.strerror or e}",
                     hint=f"{fix}. {kept} and no partial file is left: then rerun the same command to resume: "
                          f"`{command}`.")
