"""The resumable journal of `hiposeg prepare`: one JSON line per finished item.

Why: a run killed at any point must resume where it stopped, and redo only what is missing or
changed. The main process appends a record per finished item (the raw files' size/mtime, the
outputs' sizes and sha256, the pixel counts); a rerun verifies each record against the files on
disk. The first line (the header) describes the run, and marks the folder as hiposeg's. A line cut
short by a kill is skipped (its item is redone); a line hiposeg did not write is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from hiposeg.atomic import atomic_open
from hiposeg.data.codecs import BadFile, open_regular, read_regular_bytes
from hiposeg.data.layout import is_plain_name, output_paths
from hiposeg.data.sources import Item
from hiposeg.errors import UserError
from hiposeg.safeload import load_json

JOURNAL_FORMAT = "hiposeg-prepare-journal/1"


class Journal:
    """Append-only record of finished items; the first line describes the run (header)."""

    def __init__(self, path: Path, header: dict[str, Any], records: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.path, self.header, self.records = path, header, records
        self._f = None
        self._last_sync = 0.0

    @staticmethod
    def read(path: Path, *, strict: bool = True) -> tuple[dict[str, Any] | None, dict[tuple[str, str], dict[str, Any]]]:
        """(header, records by (split, stem)); header None if there is no journal or it is not hiposeg's.

        A line that is not JSON was cut short by a kill: skipped, its item is redone. A JSON line that
        is not a record hiposeg writes (the journal was edited) is a UserError when `strict`, else
        skipped, so --overwrite can still clear what the valid records name."""
        if path.is_symlink():
            raise UserError(f"{path} is a symlink; hiposeg writes its journal as a file and never appends "
                            "through a link", hint="Remove the link, or choose another --out.")
        try:
            f = open_regular(path)
        except FileNotFoundError:
            return None, {}
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}", hint="Choose an --out you can read.") from None
        except BadFile as e:
            raise UserError(f"{e}", hint="hiposeg writes its journal as a regular file: remove this one, or "
                                         "choose another --out.") from None
        header, records = None, {}
        with f:
            for n, raw_line in enumerate(f, 1):
                obj = _json_line(raw_line, path, n)
                if n == 1:
                    header = obj if journal_header_problem(obj) is None else None
                    if header is None:
                        break
                    continue
                if obj is None:
                    continue
                problem = journal_record_problem(obj)
                if problem is None:
                    records[(obj["split"], obj["stem"])] = obj
                elif strict:
                    raise UserError(f"{path}, line {n}: not a record hiposeg writes ({problem})",
                                    hint=f"The journal was edited. Rerun with --overwrite to prepare "
                                         f"{path.parent} again (hiposeg removes only the files its valid "
                                         "records name), or choose another --out.")
        return header, records

    @staticmethod
    def create(path: Path, header: dict[str, Any]) -> None:
        """Start a journal (atomically): from here on the folder is recognisably hiposeg's."""
        with atomic_open(path, "w") as f:
            f.write(json.dumps(header) + "\n")

    def open_for_append(self) -> None:
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        # a record cut short by a kill would glue onto the next one: end it with a newline
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._f.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        assert self._f is not None
        self.records[(record["split"], record["stem"])] = record
        try:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._f.flush()
            now = time.monotonic()
            if now - self._last_sync > 2.0:
                os.fsync(self._f.fileno())
                self._last_sync = now
        except OSError as e:  # e.g. a full disk: a failed write() names no file
            e.filename = e.filename or str(self.path)
            raise

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None  # closed even if the flush fails (a second close is a no-op)
            with f:
                f.flush()
                os.fsync(f.fileno())


def _json_line(line: bytes, path: Path, n: int) -> Any:
    """One journal line parsed with bounded nesting; None if it is not JSON (cut short by a kill)."""
    try:
        return load_json(line, f"{path}, line {n}")
    except UserError:
        return None


def journal_header_problem(obj: Any) -> str | None:
    """Why `obj` is not the first line of a hiposeg journal, or None."""
    if not isinstance(obj, dict) or obj.get("journal") != JOURNAL_FORMAT:
        return f'no "journal": "{JOURNAL_FORMAT}"'
    if not isinstance(obj.get("source"), str) or not isinstance(obj.get("options"), dict):
        return "no source or options"
    return None


def journal_record_problem(obj: Any) -> str | None:
    """Why `obj` is not a journal record as `convert_item` / `run_jobs` write them, or None."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    for key in ("split", "stem"):
        if not is_plain_name(obj.get(key)):
            return f"{key} {obj.get(key)!r} is not a plain folder or file name"
    if not _ints(obj.get("src"), 4):
        return "src is not 4 integers"
    if "skipped" in obj:
        bad = obj["skipped"]
        ok = isinstance(bad, dict) and isinstance(bad.get("file"), str) and isinstance(bad.get("reason"), str)
        return None if ok else "skipped is not {file, reason}"
    image = obj.get("image")
    kinds = (("link", str), ("copy", int))
    if not (isinstance(image, list) and len(image) == 2 and (image[0], type(image[1])) in kinds):
        return "image is not [link, target] or [copy, size]"
    name = obj.get("image_name")
    if "image_name" in obj and not (is_plain_name(name) and os.path.splitext(name)[0] == obj["stem"]):
        return f"image_name {name!r} is not the stem plus an extension"
    for level in ("fine", "coarse"):
        v = obj.get(level)
        if not (isinstance(v, list) and len(v) == 2 and _ints(v[:1], 1) and isinstance(v[1], str)):
            return f"{level} is not [size, sha256]"
    pixels = obj.get("pixels")
    if not (isinstance(pixels, dict) and _counts(pixels.get("fine"), ids=True)
            and _counts(pixels.get("coarse"), ids=True) and _ints([pixels.get("ignore")], 1)):
        return "pixels is not {fine, coarse, ignore} counts"
    return None if _counts(obj.get("unknown"), ids=False) else "unknown is not {value: count}"


def _ints(values: Any, n: int) -> bool:
    return isinstance(values, list) and len(values) == n and all(type(v) is int for v in values)


def _counts(d: Any, *, ids: bool) -> bool:
    """{key: int} (keys decimal class ids when `ids`)."""
    return isinstance(d, dict) and all(type(v) is int and (not ids or (k.isascii() and k.isdigit()))
                                       for k, v in d.items())


def record_is_current(rec: dict[str, Any], item: Item, out: Path, copy: bool) -> bool:
    """A journaled item is done if its raw files are unchanged and its outputs are on disk as
    journaled: label PNGs with the same size and sha256 (they are small: hashing them costs little
    next to decoding), the image link with the same target (a copy: the same size)."""
    if "skipped" in rec or rec.get("src") != file_signature(item.label) + file_signature(item.image):
        return False
    paths = output_paths(out, item.split, item.stem, item.image.suffix)
    for level in ("fine", "coarse"):
        size, digest = rec[level]
        try:
            data = read_regular_bytes(paths[level])
        except (OSError, BadFile):
            return False
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            return False
    kind, value = rec["image"]
    try:
        if kind == "link":
            return not copy and os.readlink(paths["images"]) == value
        return copy and not paths["images"].is_symlink() and paths["images"].stat().st_size == value
    except OSError:
        return False


def file_signature(path: Path) -> list[int]:
    """[size, mtime_ns]: a raw file that changes after being prepared is prepared again."""
    try:
        st = path.stat()
    except OSError:
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]
