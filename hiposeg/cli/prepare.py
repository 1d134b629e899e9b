"""`hiposeg prepare SOURCE RAW`: one sub-command per raw release, plus `folder` and `synthetic`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from hiposeg.cli.app import app, console


# ------------------------------------------------------------------------------------------
# hiposeg prepare {cityscapes,ade20k,mapillary,pascal-part,folder,synthetic}
# ------------------------------------------------------------------------------------------

prepare_app = typer.Typer(
    help="Convert a raw release (or your own images + masks) into a prepared dataset: images, fine and coarse "
         "label maps, manifest.json. Reruns resume; RAW is never modified.",
    no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")

PrepRaw = Annotated[Path, typer.Argument(help="Folder of the raw release (read only).", show_default=False)]
PrepOut = Annotated[Optional[Path], typer.Option("--out", help="Prepared dataset folder (default: data/DATASET).")]
PrepHierarchy = Annotated[Optional[str], typer.Option("--hierarchy", help="Hierarchy JSON file or built-in name "
                                                                          "(default: the release's built-in one).")]
PrepWorkers = Annotated[Optional[int], typer.Option("--workers", min=1, help="Worker processes (default: all cores; "
                                                                              "1 = in-process).")]
PrepLimit = Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N pairs of each split "
                                                                          "(a quick look).")]
PrepCopy = Annotated[bool, typer.Option("--copy", help="Copy images instead of symlinking them to RAW.")]
PrepOverwrite = Annotated[bool, typer.Option("--overwrite", help="Redo everything (default: resume, skipping "
                                                                  "finished files).")]
PrepSkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable, truncated, mismatched or unpaired "
                                                               "files (listed in manifest.json) instead of stopping.")]
PrepQuiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def _prepare_unknown_option():  # type: ignore[no-untyped-def]
    from hiposeg.data.options import UnknownPolicy

    return Annotated[UnknownPolicy, typer.Option(
        "--unknown", help="Raw label values the hierarchy does not list: stop with an error, or map them to ignore "
                          "(counted in manifest.json).")]


PrepUnknown = _prepare_unknown_option()


def _prepare_run(source: "Source", raw: Path, out: Optional[Path], dataset: str, *,  # noqa: F821
                 hierarchy: Optional[str], workers: Optional[int], limit: Optional[int], copy: bool, overwrite: bool,
                 unknown: str, skip_bad: bool, quiet: bool, ignore_unevaluated: bool = False) -> None:
    from hiposeg.data.manifest import print_summary
    from hiposeg.data.prepare import prepare

    out = out or Path("data") / dataset
    manifest = prepare(source, raw, out, hierarchy=hierarchy, workers=workers, limit=limit, copy=copy,
                       overwrite=overwrite, unknown=unknown, skip_bad=skip_bad, ignore_unevaluated=ignore_unevaluated,
                       quiet=quiet)
    print_summary(manifest, out, console)


@prepare_app.command("cityscapes")
def prepare_cityscapes(raw: PrepRaw, out: PrepOut = None, hierarchy: PrepHierarchy = None, workers: PrepWorkers = None,
                       limit: PrepLimit = None, copy: PrepCopy = False, overwrite: PrepOverwrite = False,
                       unknown: PrepUnknown = "error", skip_bad: PrepSkipBad = False, quiet: PrepQuiet = False) -> None:
    """Cityscapes gtFine: 19 classes (trainIds) in 7 categories.

    Expected layout (leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip unpacked into RAW):

      RAW/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png
      RAW/gtFine/{train,val}/CITY/*_gtFine_labelIds.png

    The 8-bit labelIds are mapped to trainIds (fine) and categories (coarse);
    ids without a trainId become 255 (ignore).
    """
    from hiposeg.data.cityscapes import Cityscapes

    _prepare_run(Cityscapes(), raw, out, "cityscapes", hierarchy=hierarchy, workers=workers, limit=limit, copy=copy,
                 overwrite=overwrite, unknown=unknown, skip_bad=skip_bad, quiet=quiet)


@prepare_app.command("ade20k")
def prepare_ade20k(raw: PrepRaw, out: PrepOut = None, hierarchy: PrepHierarchy = None, workers: PrepWorkers = None,
                   limit: PrepLimit = None, copy: PrepCopy = False, overwrite: PrepOverwrite = False,
                   unknown: PrepUnknown = "error", skip_bad: PrepSkipBad = False, quiet: PrepQuiet = False) -> None:
    """ADE20K SceneParsing (150 classes).

    Expected layout (RAW = the ADEChallengeData2016 folder):

      RAW/images/{training,validation}/ADE_*.jpg
      RAW/annotations/{training,validation}/ADE_*.png

    Annotation value 0 (other) -> 255 (ignore), 1..150 -> classes 0..149.
    Output splits: train, val.
    """
    from hiposeg.data.ade20k import ADE20K

    _prepare_run(ADE20K(), raw, out, "ade20k", hierarchy=hierarchy, workers=workers, limit=limit, copy=copy,
                 overwrite=overwrite, unknown=unknown, skip_bad=skip_bad, quiet=quiet)


@prepare_app.command("mapillary")
def prepare_mapillary(raw: PrepRaw, out: PrepOut = None, hierarchy: PrepHierarchy = None, workers: PrepWorkers = None,
                      limit: PrepLimit = None, copy: PrepCopy = False, overwrite: PrepOverwrite = False,
                      unknown: PrepUnknown = "error", skip_bad: PrepSkipBad = False, quiet: PrepQuiet = False,
                      ignore_unevaluated: Annotated[bool, typer.Option(
                          "--ignore-unevaluated", help="Map the classes the benchmark does not score (\"evaluate\": "
                                                       "false) to ignore.")] = False) -> None:
    """Mapillary Vistas 2.0 (124 classes).

    Expected layout:

      RAW/config_v2.0.json
      RAW/{training,validation}/images/KEY.jpg
      RAW/{training,validation}/v2.0/labels/KEY.png

    Labels are palette PNGs whose palette index is the class id (read as
    indices, never as colours). The config's label names and order must match
    the hierarchy. Output splits: train, val.
    """
    from hiposeg.data.mapillary import Mapillary

    _prepare_run(Mapillary(), raw, out, "mapillary", hierarchy=hierarchy, workers=workers, limit=limit, copy=copy,
                 overwrite=overwrite, unknown=unknown, skip_bad=skip_bad, quiet=quiet,
                 ignore_unevaluated=ignore_unevaluated)


@prepare_app.command("pascal-part")
def prepare_pascal_part(
    raw: PrepRaw, out: PrepOut = None, hierarchy: PrepHierarchy = None, workers: PrepWorkers = None,
    limit: PrepLimit = None, copy: PrepCopy = False, overwrite: PrepOverwrite = False, unknown: PrepUnknown = "error",
    skip_bad: PrepSkipBad = False, quiet: PrepQuiet = False,
    images: Annotated[Optional[Path], typer.Option(help="GMNet layout: the images folder (relative to RAW), if "
                                                       "detection is ambiguous.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="GMNet layout: the 108-part label folder.")] = None,
    lists: Annotated[Optional[Path], typer.Option(help="GMNet layout: the folder with train.txt / val.txt.")] = None,
) -> None:
    """PASCAL-Part-108 (108 parts in 21 objects).

    Expected layout, either

      (a) the GMNet release: images named by VOC id (2008_000045.jpg or .png),
          one-channel label PNGs with the same names (0..107, 255 = ignore)
          and split lists train.txt / val.txt, in folders up to 4 levels
          below RAW (found by content, or named with --images/--labels/--lists)
      (b) RAW/img_dir/{train,val}/*.jpg + RAW/ann108_dir/{train,val}/*.png
    """
    from hiposeg.data.pascal_part import PascalPart

    _prepare_run(PascalPart(images=images, labels=labels, lists=lists), raw, out, "pascal-part", hierarchy=hierarchy,
                 workers=workers, limit=limit, copy=copy, overwrite=overwrite, unknown=unknown, skip_bad=skip_bad,
                 quiet=quiet)


@prepare_app.command("folder")
def prepare_folder(
    raw: PrepRaw,
    hierarchy: Annotated[str, typer.Option("--hierarchy", help="Your hierarchy JSON file (README: 'Hierarchy files').",
                                           show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="Prepared dataset folder (default: data/NAME-OF-RAW).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        "--val-fraction", help="Flat layout only: share of images sent to val (default 0.1), by a hash of "
                               "(seed, file stem).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --val-fraction split.")] = 0,
    workers: PrepWorkers = None, limit: PrepLimit = None, copy: PrepCopy = False, overwrite: PrepOverwrite = False,
    unknown: PrepUnknown = "error", skip_bad: PrepSkipBad = False, quiet: PrepQuiet = False,
) -> None:
    """Your own images + masks, with your hierarchy.

    Expected layout (masks pair with images by file stem):

      RAW/SPLIT/images/* + RAW/SPLIT/masks/*.png   one split per folder
      RAW/images/*       + RAW/masks/*.png         split by --val-fraction

    ("labels/" or "annotations/" may stand for "masks/".) A mask is either an
    index PNG (8/16-bit gray, or a palette PNG read as indices) holding the
    hierarchy's raw values (its leaf ids if it lists none), or a colour PNG
    whose colours are the hierarchy's leaf colours. Any other value or colour
    is an error naming it (--unknown ignore maps it to ignore).
    """
    from hiposeg.data.folder import Folder

    _prepare_run(Folder(val_fraction=val_fraction, seed=seed), raw, out, raw.resolve().name, hierarchy=hierarchy,
                 workers=workers, limit=limit, copy=copy, overwrite=overwrite, unknown=unknown, skip_bad=skip_bad,
                 quiet=quiet)


@prepare_app.command("synthetic")
def prepare_synthetic(
    out: Annotated[Path, typer.Option("--out", help="Prepared dataset folder.")] = Path("data/synthetic"),
    train: Annotated[int, typer.Option(min=1, help="Training images.")] = 500,
    val: Annotated[int, typer.Option(min=1, help="Validation images.")] = 100,
    size: Annotated[int, typer.Option(min=32, help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives byte-identical files.")] = 0,
    workers: PrepWorkers = None, overwrite: PrepOverwrite = False, quiet: PrepQuiet = False,
) -> None:
    """The built-in synthetic set (no download): 15 parts in 5 objects.

    Procedural scenes of houses, cars, buses and boats whose parts share one
    texture bank (body, glass, dark, stripe), so a part's label depends on the
    object around it. The same --seed gives byte-identical files.
    """
    from hiposeg.data.manifest import print_summary
    from hiposeg.data.output import kept_note
    from hiposeg.data.synthetic import generate

    made = generate(out, train=train, val=val, size=size, seed=seed, workers=workers, overwrite=overwrite, quiet=quiet)
    if made.reused:
        console.print(Text(f"{out} already holds this synthetic set (same settings): nothing to do"))
        print_summary(made.manifest, out, console)
        return
    print_summary({**made.manifest, "_run": {"notes": kept_note(out, made.kept)}}, out, console)
