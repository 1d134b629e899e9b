"""The `hiposeg prepare` driver: raw release -> prepared dataset (README "Preparing data").

One converter module per release (`cityscapes.py`, `ade20k.py`, ...) only *discovers* the
(image, label) pairs of its layout and says how its label files are decoded (`sources.py`). This
module runs the steps that are the same for every source, each done by a module of its own:

1. **Check** the input: RAW exists, `--out` is not inside RAW (raw data is never written), the
   output folder is new, empty or provably hiposeg's (`output.py`; any other folder is refused,
   even with `--overwrite`, before anything is written there), made by the same command (else
   `--overwrite`, which removes only what hiposeg wrote). One process at a time holds the folder
   (`hiposeg.lock`); the journal is started first, so the folder is recognisably hiposeg's before
   any other file is written.
2. **Convert** each pair in a pool of worker processes (`pool.py`, `convert.py`; `--workers`,
   default: all cores): LUTs from raw values to fine and coarse ids, both PNGs written atomically,
   the image symlinked (or `--copy`).
3. **Journal** every finished item from the main process (`journal.py`). A rerun verifies each
   record against the files on disk and redoes only what is missing or changed, so a run killed
   at any point resumes where it stopped; temp files of writes in flight are removed.
4. **Manifest**: `DATA/manifest.json` (`manifest.py`) is written last; its presence means "done".

Per-file problems (unreadable, truncated or empty files, FIFOs or devices where a file is expected,
size mismatches, colour labels where an index map is expected, missing partners) are collected and
reported together with the file and the fix; `--skip-bad` skips them instead and lists them in the
manifest. Raw values the hierarchy does not know are an error naming the values and the first
files, or, with `--unknown ignore`, mapped to ignore and counted in the manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hiposeg.atomic import atomic_write_json
from hiposeg.data.codecs import BadFile, max_pixels
from hiposeg.data.convert import Job, build_luts, convert_in_worker, init_worker
from hiposeg.data.journal import JOURNAL_FORMAT, Journal, file_signature, record_is_current
from hiposeg.data.layout import HIERARCHY_NAME, JOURNAL_NAME, MANIFEST_NAME, split_dirs
from hiposeg.data.manifest import build_manifest, value_order
from hiposeg.data.options import UnknownPolicy
from hiposeg.data.output import (check_may_write, check_out_not_in_raw, check_split_dirs_inside, clear_prepared,
                                 inspect_output, kept_note, output_errors, recorded_image_name, remove_own_file,
                                 remove_scratch, remove_temp_files, write_error)
from hiposeg.data.pool import WorkerPool, default_workers, progress_bar
from hiposeg.data.sources import Item, Source, check_dir
from hiposeg.errors import UserError
from hiposeg.hierarchy import Hierarchy
from hiposeg.lock import DirectoryLock

# Options a rerun may change without --overwrite: they change no output byte ("unknown" only matters
# for files holding unknown values, and those records are checked against it one by one).
NON_OUTPUT_OPTIONS = frozenset({"limit", "skip_bad", "workers", "unknown"})
MAX_REPORTED_FILES = 5  # bad files listed in an error message
GRACE_ITEMS = 32  # after the first bad file, look at up to this many more to report several at once


def open_output(out: Path, header: dict[str, Any], source: Source, raw: Path, overwrite: bool,
                splits: Iterable[str]) -> tuple[Journal, list[str]]:
    """Under the folder's lock: check `out` may be written (its `splits` folders included), clear it for
    --overwrite, and return its journal (started, so the folder is recognisably hiposeg's before
    anything else is written) and the files --overwrite kept."""
    state = inspect_output(out, strict=not overwrite)
    check_may_write(state, f"data/{source.name}")
    check_split_dirs_inside(out, splits)
    remove_scratch(out)
    journal_path = out / JOURNAL_NAME
    if not state.entries or overwrite:
        kept = clear_prepared(state, header) if state.entries else []
        Journal.create(journal_path, header)
        return Journal(journal_path, header, {}), kept
    if state.journal_header is None:
        raise UserError(f"{out} already holds a prepared dataset ({state.source}) made without a resumable journal",
                        hint=f"Add --overwrite to prepare it again from {raw}, or choose another --out.")
    mismatch = [k for k in ("source", "hierarchy_sha256", "options")
                if _comparable(state.journal_header.get(k)) != _comparable(header.get(k))]
    if mismatch:
        was = {k: state.journal_header.get(k) for k in mismatch}
        now = {k: header.get(k) for k in mismatch}
        raise UserError(f"{out} was prepared with different settings: {_diff_text(was, now)}",
                        hint="Add --overwrite to prepare it again with the new settings, or choose another --out.")
    return Journal(journal_path, header, state.records), []


def _comparable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: x for k, x in v.items() if k not in NON_OUTPUT_OPTIONS}
    return v


def _diff_text(was: dict[str, Any], now: dict[str, Any]) -> str:
    parts = []
    for k in was:
        a, b = _comparable(was[k]), _comparable(now[k])
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(a.keys() | b.keys()):
                if a.get(key) != b.get(key):
                    parts.append(f"{key}: was {a.get(key)!r}, now {b.get(key)!r}")
        elif k == "hierarchy_sha256":
            parts.append("the hierarchy differs (different class tree or raw mapping)")
        else:
            parts.append(f"{k}: was {a!r}, now {b!r}")
    return "; ".join(parts)


@dataclass
class RunOutcome:
    done: int = 0
    bad: list[BadFile] = field(default_factory=list)
    unknown: list[tuple[str, dict[str, int]]] = field(default_factory=list)


def prepare(source: Source, raw: Path, out: Path, *, hierarchy: Hierarchy | str | None = None,
            workers: int | None = None, limit: int | None = None, copy: bool = False, overwrite: bool = False,
            unknown: UnknownPolicy | str = UnknownPolicy.error, skip_bad: bool = False,
            ignore_unevaluated: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Convert a raw release into a prepared dataset at `out`; returns the manifest."""
    raw, out = Path(raw), Path(out)
    unknown = UnknownPolicy(unknown).value
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} must be at least 1")
    if not check_dir(raw, "RAW"):
        raise UserError(f"raw release folder not found: {raw}" if not raw.exists() else f"RAW {raw} is not a folder",
                        hint=f"Give the folder of the {source.name} release: `{source.command('RAW', out)}` "
                             f"(`hiposeg prepare {source.name} --help` shows the layout).")
    check_out_not_in_raw(raw, out)
    max_pixels()  # a bad $HIPOSEG_MAX_PIXELS is one message here, not one per worker
    h = hierarchy if isinstance(hierarchy, Hierarchy) else Hierarchy.load(hierarchy or source.hierarchy_for(raw))
    source.check(raw, h)
    found = source.discover(raw)
    selected = {s: items[:limit] if limit else items for s, items in found.items.items()}
    options = {"unknown": unknown, "ignore_unevaluated": ignore_unevaluated, "copy": copy, "limit": limit,
               "skip_bad": skip_bad, **source.options()}
    header = {"journal": JOURNAL_FORMAT, "source": source.name, "raw_root": str(raw.resolve()),
              "hierarchy_name": h.name, "hierarchy_sha256": h.sha256, "options": options}
    if found.orphans and not skip_bad:
        raise _bad_files_error(found.orphans)
    if not any(selected.values()) and not found.orphans:
        raise UserError(f"no {source.name} image/label pairs found under {raw}",
                        hint=f"`hiposeg prepare {source.name} --help` shows the expected layout.")
    check_may_write(inspect_output(out, strict=not overwrite), f"data/{source.name}")  # before the lock writes
    resume_hint = source.command(raw, out)
    with DirectoryLock(out, "prepared dataset folder"), output_errors(out, resume_hint):
        journal, kept = open_output(out, header, source, raw, overwrite, selected)
        for d in split_dirs(out, selected):
            remove_temp_files(d)
        if not (out / HIERARCHY_NAME).exists():
            atomic_write_json(out / HIERARCHY_NAME, h.to_dict())
        todo = [it for items in selected.values() for it in items
                if not _is_done(journal, it, out, copy=copy, skip_bad=skip_bad, unknown=unknown)]
        remove_renamed_images(journal, todo, out)
        total = sum(len(v) for v in selected.values())
        lut, lut_fine, lut_coarse = build_luts(h, ignore_unevaluated=ignore_unevaluated)
        job = Job(out=out, reader=source.reader(h), lut=lut, lut_out_fine=lut_fine, lut_out_coarse=lut_coarse,
                  ignore_index=h.ignore_index, unknown=unknown, copy=copy)
        outcome = run_jobs(job, todo, total, journal, workers=min(workers or default_workers(), max(1, len(todo))),
                           skip_bad=skip_bad, quiet=quiet, label=f"prepare {source.name}", resume_hint=resume_hint)
        if outcome.unknown:
            raise _unknown_values_error(outcome.unknown, h)
        if outcome.bad:
            raise _bad_files_error(outcome.bad)
        manifest = build_manifest(source, raw, h, options, found, journal)
        atomic_write_json(out / MANIFEST_NAME, manifest)
    manifest["_run"] = {"converted": outcome.done, "reused": total - len(todo),
                        "notes": found.notes + kept_note(out, kept)}
    return manifest


def remove_renamed_images(journal: Journal, todo: list[Item], out: Path) -> None:
    """An item redone under another image name (`t0.jpg` became `t0.png` in RAW) must not leave the
    old image output beside the new one: a loader pairing by stem could pick the stale one."""
    for item in todo:
        rec = journal.records.get((item.split, item.stem))
        old = recorded_image_name(rec) if rec and "skipped" not in rec else None
        if old is not None and old != item.stem + item.image.suffix:
            remove_own_file(out, out / item.split / "images" / old)


def _is_done(journal: Journal, item: Item, out: Path, *, copy: bool, skip_bad: bool, unknown: str) -> bool:
    """Finished in an earlier run (outputs verified), or skipped as bad and unchanged since. A file
    whose unknown values were mapped to ignore is redone (and reported) under --unknown error."""
    rec = journal.records.get((item.split, item.stem))
    if rec is None:
        return False
    if "skipped" in rec:
        return skip_bad and rec["src"] == file_signature(item.label) + file_signature(item.image)
    if rec["unknown"] and unknown == UnknownPolicy.error.value:
        return False
    return record_is_current(rec, item, out, copy)


def run_jobs(job: Job, todo: list[Item], total: int, journal: Journal, *, workers: int, skip_bad: bool,
             quiet: bool, label: str, resume_hint: str) -> RunOutcome:
    """Convert `todo` in parallel, journaling each finished item; stop early on bad input."""
    outcome = RunOutcome()
    journal.open_for_append()
    try:
        with WorkerPool(workers, init_worker, (job,)) as pool, progress_bar(quiet) as bar:
            task = bar.add_task(label, total=total, completed=total - len(todo))
            since_failure = -1  # items seen since the first failure (-1: none yet)
            for rec in pool.imap_unordered(convert_in_worker, todo):
                bar.advance(task)
                if "bad" in rec and skip_bad:
                    journal.append({"split": rec["split"], "stem": rec["stem"], "src": rec["src"], "skipped": rec["bad"]})
                elif "bad" in rec:
                    outcome.bad.append(BadFile(rec["bad"]["file"], rec["bad"]["reason"]))
                elif "fine" not in rec:  # raw values the hierarchy does not know, policy "error"
                    outcome.unknown.append((rec["file"], rec["unknown"]))
                else:
                    journal.append(rec)
                    outcome.done += 1
                failures = len(outcome.bad) + len(outcome.unknown)
                since_failure += since_failure >= 0 or failures > 0
                if failures >= MAX_REPORTED_FILES or since_failure >= GRACE_ITEMS:
                    pool.stop()  # enough to report: let the files in flight finish, start no more
    except KeyboardInterrupt:
        raise UserError(f"interrupted after {total - len(todo) + outcome.done} of {total} files (the finished ones "
                        "are kept)", hint=f"Rerun the same command to resume: `{resume_hint}`.") from None
    except OSError as e:  # writing an output failed (disk full, permissions); unreadable inputs are BadFile
        with contextlib.suppress(OSError):
            journal.close()  # may fail the same way: records it cannot write are redone by the rerun
        done = total - len(todo) + outcome.done
        raise write_error(e, job.out, resume_hint, done) from None
    finally:
        journal.close()
    return outcome


def _bad_files_error(bad: list[BadFile]) -> UserError:
    bad = sorted(bad, key=lambda b: b.file)
    lines = [f"  {b.file}: {b.reason}" for b in bad[:MAX_REPORTED_FILES]]
    more = f"\n  ... and {len(bad) - MAX_REPORTED_FILES} more" if len(bad) > MAX_REPORTED_FILES else ""
    n = len(bad)
    return UserError(f"{n} input file{'s' if n > 1 else ''} cannot be prepared:\n" + "\n".join(lines) + more,
                     hint="Fix or replace those files and rerun (finished files are kept), or add --skip-bad to "
                          "leave them out (they are listed in manifest.json).")


def _unknown_values_error(found: list[tuple[str, dict[str, int]]], h: Hierarchy) -> UserError:
    found = sorted(found)
    values: dict[str, int] = {}
    for _, u in found:
        for k, v in u.items():
            values[k] = values.get(k, 0) + v
    shown = ", ".join(f"{k} ({v} px)" for k, v in sorted(values.items(), key=lambda kv: value_order(kv[0]))[:20])
    files = "\n".join(f"  {f}: {', '.join(sorted(u, key=value_order)[:10])}" for f, u in found[:MAX_REPORTED_FILES])
    more = f"\n  ... and {len(found) - MAX_REPORTED_FILES} more files" if len(found) > MAX_REPORTED_FILES else ""
    return UserError(f"label values that hierarchy {h.name!r} does not know: {shown}\nfirst files:\n{files}{more}",
                     hint="Check that RAW is the release this hierarchy describes (or pass the matching --hierarchy "
                          "FILE), or add --unknown ignore to map these values to ignore (they are counted in "
                          "manifest.json).")
