"""manifest.json, the last file `prepare` writes (its presence means "done"): build it, check that a
folder's manifest is hiposeg's, and print it as the summary of a run.

Why a module of its own: the converters and the synthetic set write the same format (README
"Preparing data"), and a folder holding a manifest in this format is what `--overwrite` may clear,
so the format is written and recognised in one place.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hiposeg import __version__
from hiposeg.data.codecs import BadFile, read_regular_bytes
from hiposeg.data.journal import Journal
from hiposeg.data.layout import is_plain_name
from hiposeg.data.sources import Discovery, Source
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.safeload import load_json

MANIFEST_FORMAT = "hiposeg-prepared/1"
MANIFEST_KEYS = frozenset({"format", "hiposeg_version", "source", "raw_root", "hierarchy", "levels", "ignore_index",
                           "options", "splits", "missing_splits", "created"})


def read_own_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the manifest, None) if `path` is a hiposeg manifest; (None, why not, naming the file) if it is
    something else; (None, None) if there is none."""
    try:
        data = load_json(read_regular_bytes(path), str(path))
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path}: {e.strerror or e}"
    except (BadFile, UserError) as e:
        return None, str(e).splitlines()[0]
    problem = manifest_problem(data)
    return (data, None) if problem is None else (None, f"{path}: {problem}")


def manifest_problem(data: Any) -> str | None:
    """Why `data` is not a manifest as `manifest_dict` writes it, or None."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return f'it has no "format": "{MANIFEST_FORMAT}"'
    missing = sorted(MANIFEST_KEYS - data.keys())
    if missing:
        return f"it lacks {', '.join(missing)}"
    if not isinstance(data["source"], str) or not isinstance(data["options"], dict):
        return "its source or options are malformed"
    if not isinstance(data["splits"], dict) or not all(is_plain_name(s) for s in data["splits"]):
        return f"its splits {list(data['splits'])[:5] if isinstance(data['splits'], dict) else data['splits']!r} " \
               "are not plain folder names"
    return None


def build_manifest(source: Source, raw: Path, h: Hierarchy, options: dict[str, Any], found: Discovery,
                   journal: Journal) -> dict[str, Any]:
    """Totals over every journaled item that RAW still holds (also those of earlier runs)."""
    fine_names, coarse_names = h.names(h.fine_level), h.names(h.coarse_level)
    discovered = {(it.split, it.stem) for items in found.items.values() for it in items}
    splits: dict[str, Any] = {}
    for split in sorted(found.items, key=split_order):
        fine = np.zeros(len(fine_names), np.int64)
        coarse = np.zeros(len(coarse_names), np.int64)
        ignore, images = 0, 0
        unknown: dict[str, int] = {}
        skipped = [o.as_dict() for o in found.orphans if o.split == split]
        for (s, stem), rec in sorted(journal.records.items()):
            if s != split or (s, stem) not in discovered:
                continue
            if "skipped" in rec:
                skipped.append(rec["skipped"])
                continue
            images += 1
            add_counts(fine, rec["pixels"]["fine"], journal.path, stem)
            add_counts(coarse, rec["pixels"]["coarse"], journal.path, stem)
            ignore += rec["pixels"]["ignore"]
            for k, v in rec["unknown"].items():
                unknown[k] = unknown.get(k, 0) + v
        splits[split] = {
            "images": images,
            "pixels": {"fine": dict(zip(fine_names, fine.tolist())), "coarse": dict(zip(coarse_names, coarse.tolist())),
                       "ignore": ignore},
            "unknown_values": dict(sorted(unknown.items(), key=lambda kv: value_order(kv[0]))),
            "skipped": sorted(skipped, key=lambda x: x["file"]),
        }
    return manifest_dict(source=source.name, raw_root=str(raw.resolve()), hierarchy=h, options=options,
                         splits=splits, missing_splits=found.missing_splits)


def add_counts(total: np.ndarray, counts: dict[str, int], journal: Path, stem: str) -> None:
    """total[id] += pixels for a record's {id: pixels}; ids beyond the hierarchy mean an edited journal."""
    for k, v in counts.items():
        if int(k) >= len(total):
            raise UserError(f"{journal}: the record of {stem!r} counts class id {k}, but the hierarchy has "
                            f"{len(total)} classes at that level (the journal was edited)",
                            hint="Rerun with --overwrite to prepare the dataset again.")
        total[int(k)] += v


def manifest_dict(*, source: str, raw_root: str | None, hierarchy: Hierarchy, options: dict[str, Any],
                  splits: dict[str, Any], missing_splits: list[str]) -> dict[str, Any]:
    """The manifest.json layout (README "Preparing data"), shared by the converters and the synthetic set."""
    return {
        "format": MANIFEST_FORMAT,
        "hiposeg_version": __version__,
        "source": source,
        "raw_root": raw_root,
        "hierarchy": {"name": hierarchy.name, "sha256": hierarchy.sha256},
        "levels": {"fine": hierarchy.fine_level, "coarse": hierarchy.coarse_level},
        "ignore_index": hierarchy.ignore_index,
        "options": options,
        "splits": splits,
        "missing_splits": missing_splits,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def split_order(split: str) -> tuple[int, str]:
    order = {"train": 0, "val": 1, "test": 2}
    return order.get(split, 3), split


def value_order(v: str) -> tuple[int, Any]:
    return (0, int(v)) if v.isdigit() else (1, v)


def print_summary(manifest: dict[str, Any], out: Path, console: Any) -> None:
    """The table of splits and the notes. Names from files (paths, splits, file names) are printed as
    text, never as Rich markup: a `[/]` in a name must not break or restyle the output."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"prepared {manifest['source']} -> {out}"), title_justify="left")
    for col in ("split", "images", "skipped", "ignore px", "unknown px", "classes present (fine)"):
        table.add_column(col, justify="left" if col in ("split",) else "right")
    for split, s in manifest["splits"].items():
        px = s["pixels"]
        total = sum(px["fine"].values()) + px["ignore"]
        ign = f"{100 * px['ignore'] / total:.1f}%" if total else "-"
        present = sum(1 for v in px["fine"].values() if v)
        table.add_row(escape(split), str(s["images"]), str(len(s["skipped"])), ign,
                      str(sum(s["unknown_values"].values())), f"{present}/{len(px['fine'])}")
    console.print(table)
    run = manifest.get("_run", {})
    for note in run.get("notes", []):
        console.print(f"[dim]{escape(note)}[/dim]")
    if "converted" in run:
        console.print(f"converted {run['converted']} file(s), {run['reused']} already done (resumed)")
    if manifest["missing_splits"]:
        console.print(f"[yellow]missing splits[/yellow] (not in RAW): {escape(', '.join(manifest['missing_splits']))}")
    skipped = [x for s in manifest["splits"].values() for x in s["skipped"]]
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} bad file(s)[/yellow] (listed in manifest.json):")
        for x in skipped[:10]:
            console.print(escape(f"  {x['file']}: {x['reason']}"))
    unknown = {k for s in manifest["splits"].values() for k in s["unknown_values"]}
    if unknown:
        shown = ", ".join(sorted(unknown, key=value_order))
        console.print(f"[yellow]unknown raw values mapped to ignore[/yellow]: {escape(shown)}")
    levels = escape(f"{{{','.join(manifest['splits'])}}}/{{images,fine,coarse}}")
    console.print(f"dataset ready: [bold]{escape(str(out))}[/bold] (manifest.json, hierarchy.json, {levels})")
