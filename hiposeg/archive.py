"""torch zip archives (`.pt` checkpoints and models, `.pt2` programs, the sample inputs inside a `.pt2`),
judged before torch reads a byte of their payload.

Why: torch's zip reader (miniz) inflates a compressed entry in memory before anything can look at
it, so a small file can claim gigabytes (a deflated zero tensor of 5 GiB costs ~5 MB of file). Python's
zipfile and torch's reader can also disagree about an archive: a name stored twice (torch meets
whichever copy its binary search finds, Python reads the last one), names equal but for case (torch
looks names up case-insensitively). So an archive is read by both, and accepted only when

* both list the same entries, each name once regardless of case, with the same sizes;
* every entry is stored (`torch.save` and `torch.export.save` never compress);
* the entries' sizes add up to no more than the file holds (no entry read twice through overlap).

Then torch loads at most the file's size into memory, and reads what was judged.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import torch

from hiposeg.errors import UserError

# What a caller raises: `refuse(why)` for a crafted archive, `invalid(error)` for a damaged one.
Refuse = Callable[[str], UserError]
Invalid = Callable[[Exception], UserError]


@dataclass
class Archive:
    """An archive both readers agree on: torch's reader over it, and its record names (without the
    archive's root folder), in the order stored."""

    reader: Any  # torch._C.PyTorchFileReader
    records: list[str]


def check_archive(source: IO[bytes] | bytes, size: int, refuse: Refuse, invalid: Invalid) -> Archive:
    """The checks of the module docstring on `source` (an open file or the archive's bytes) of `size`
    bytes. The caller then hands torch the very same file object or bytes."""
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    infos = _python_entries(f, invalid)
    f.seek(0)
    reader = reading(lambda: torch._C.PyTorchFileReader(f), invalid)
    records = reading(reader.get_all_records, invalid)
    root = infos[0].filename.split("/")[0] if infos else ""
    if [i.filename for i in infos] != [f"{root}/{r}" for r in records]:
        raise refuse("Python's zip reader and torch's list different entries (a crafted archive)")
    refuse_ambiguous_names(records, refuse)
    for info, record in zip(infos, records):
        if info.compress_type != zipfile.ZIP_STORED:
            raise refuse(f"its entry {record[:80]!r} is compressed, which torch would inflate in memory before any "
                         "check (hiposeg's files store every entry uncompressed)")
        if not info.file_size == info.compress_size == reading(lambda: reader.get_record_size(record), invalid):
            raise refuse(f"its entry {record[:80]!r} declares {info.file_size:,} bytes but stores "
                         f"{info.compress_size:,}")
    declared = sum(i.file_size for i in infos)
    if declared > size:
        raise refuse(f"its entries declare {declared:,} bytes in all, more than the file's {size:,} (entries "
                     "that overlap)")
    f.seek(0)
    return Archive(reader, records)


def check_torch_file(f: IO[bytes], size: int, refuse: Refuse, invalid: Invalid) -> None:
    """`check_archive` for a file `torch.load` will read, when it is a zip archive; a file in torch's
    legacy format (nothing compressed) or a damaged one is left to torch.load to read or diagnose."""
    if zipfile.is_zipfile(f):
        check_archive(f, size, refuse, invalid)
    f.seek(0)


def refuse_ambiguous_names(records: list[str], refuse: Refuse) -> None:
    """Names that torch could resolve to another entry than the one judged: the same name twice, or
    names equal but for case (torch's zip reader, miniz, looks names up case-insensitively)."""
    seen: dict[str, str] = {}
    for name in records:
        other = seen.get(name.lower())
        if other is None:
            seen[name.lower()] = name
        elif other == name:
            raise refuse(f"it stores the entry {name[:80]!r} twice (torch reads one copy, Python's zipfile the other)")
        else:
            raise refuse(f"its entries {other[:80]!r} and {name[:80]!r} differ only in case (torch looks names up "
                         "without regard to case, so it may read either)")


def reading(read: Callable[[], Any], invalid: Invalid) -> Any:
    """A call into torch's archive reader; its failures (a damaged or malformed archive) as `invalid`."""
    try:
        return read()
    except RuntimeError as e:
        raise invalid(e) from None


def _python_entries(f: IO[bytes], invalid: Invalid) -> list[zipfile.ZipInfo]:
    """The entries as Python's zipfile reads them (the central directory)."""
    try:
        with zipfile.ZipFile(f) as zf:
            return zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise invalid(e) from None

