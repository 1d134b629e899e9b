"""The `hiposeg` command line: each command parses its flags, builds a validated config and calls
one function. User mistakes (`UserError`) are printed as one clear message with exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from rich.tree import Tree

from hiposeg import __version__
from hiposeg.errors import UserError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="hiposeg",
    help="Hierarchical prototype learning for semantic segmentation (HiPoSeg): prepare data, train, "
    "evaluate, ablate, export and predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"hiposeg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """hiposeg: DeepLabV3+ with a training-only hierarchical prototype branch."""


# ------------------------------------------------------------------------------------------
# hiposeg hierarchy show | validate
# ------------------------------------------------------------------------------------------

hierarchy_app = typer.Typer(help="Inspect and validate label hierarchy files.", no_args_is_help=True)
app.add_typer(hierarchy_app, name="hierarchy")


def _swatch(rgb: tuple[int, int, int]) -> Text:
    return Text("  ", style=f"on rgb({rgb[0]},{rgb[1]},{rgb[2]})")


@hierarchy_app.command("show")
def hierarchy_show(
    name: Annotated[str, typer.Argument(help="Built-in name (cityscapes, ade20k, mapillary_v2, pascal_part_108, "
                                             "synthetic) or a path to a JSON file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the normalised JSON instead of a tree.")] = False,
) -> None:
    """Draw a hierarchy as a tree with ids, colour swatches and per-level counts."""
    from hiposeg.hierarchy import Hierarchy

    h = Hierarchy.load(name)
    if as_json:
        sys.stdout.write(json.dumps(h.to_dict(), indent=2) + "\n")
        return
    levels = h.level_names
    title = Text.assemble((h.title, "bold"), "  ", (h.summary(), "cyan"))
    tree = Tree(title)

    def add(node: Tree, li: int, cid: int) -> None:
        c = h.classes(levels[li])[cid]
        label = Text.assemble(_swatch(c.color), " ", (f"{c.id:>3} ", "dim"), c.name,
                              (f"  [{levels[li]}]", "dim"), ("" if c.evaluate else "  (not evaluated)", "yellow"))
        child = node.add(label)
        if li > 0:
            for k in h.children(levels[li])[cid]:
                add(child, li - 1, k)

    top = len(levels) - 1
    for c in h.classes(levels[top]):
        add(tree, top, c.id)
    console.print(tree)
    console.print(Text.assemble("training levels: fine = ", (h.fine_level, "bold"), ", coarse = ",
                                (h.coarse_level, "bold"), f"; ignore value {h.ignore_index}"))
    console.print(Text(f"source: {h.source}", style="dim"))


@hierarchy_app.command("validate")
def hierarchy_validate(
    file: Annotated[Path, typer.Argument(help="Hierarchy JSON file to check.")],
) -> None:
    """Check a hierarchy file: exit 0 if valid, 2 with the problems otherwise."""
    from hiposeg.hierarchy import Hierarchy

    h = Hierarchy.from_file(file)
    console.print(Text.assemble(("valid", "green"), f": {file} — {h.name}: {h.summary()} "
                                f"(train fine={h.fine_level!r}, coarse={h.coarse_level!r})"))


# ------------------------------------------------------------------------------------------
# hiposeg train | eval
# ------------------------------------------------------------------------------------------

DATASET_HELP = "cityscapes, ade20k, mapillary, pascal-part or synthetic (the built-in default)."


def parse_crop(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().replace("×", "x").split("x"))
    except ValueError:
        raise UserError(f"--crop {value!r} is not of the form HxW", hint="Example: --crop 512x1024") from None
    return h, w


def train_overrides(**flags: object) -> dict:
    """Nested config overrides from the named flags that were actually given (None = not given)."""
    where = {
        "dataset": ("data", "dataset"), "data": ("data", "root"), "crop": ("data", "crop"),
        "workers": ("data", "workers"), "backbone": ("model", "backbone"), "pretrained": ("model", "pretrained"),
        "output_stride": ("model", "output_stride"), "losses": ("loss", "terms"), "schedule": ("loss", "schedule"),
        "iters": ("optim", "iters"), "batch_size": ("optim", "batch_size"), "lr": ("optim", "lr"),
        "out": ("run", "out"), "seed": ("run", "seed"), "gpus": ("run", "gpus"), "device": ("run", "device"),
        "amp": ("run", "amp"), "ckpt_every": ("run", "ckpt_every"), "eval_every": ("run", "eval_every"),
        "deterministic": ("run", "deterministic"), "channels_last": ("run", "channels_last"),
        "quiet": ("run", "quiet"),
    }
    out: dict = {}
    for name, value in flags.items():
        if value is None or value is False and name in ("deterministic", "channels_last", "quiet"):
            continue
        if name == "crop":
            value = parse_crop(str(value))
        if isinstance(value, Path):
            value = str(value)
        section, key = where[name]
        out.setdefault(section, {})[key] = value
    if "root" in out.get("data", {}) and "dataset" not in out["data"]:
        out["data"]["dataset"] = "custom"
    return out


def resolve_train_config(config_file: Optional[Path], flags: dict, sets: list[str],
                         resume: Optional[str]) -> tuple["TrainConfig", Optional[Path]]:  # noqa: F821
    """Build the run's config. On --resume the checkpoint's config is the base: only run.* fields
    (devices, precision, logging, checkpoint cadence; not the seed, which fixes the data stream) and
    where the data lives may change, so a resumed run is the same experiment; the engine then checks
    the data's hierarchy against the checkpoint's."""
    from hiposeg import checkpoint
    from hiposeg.config import build_config, deep_update, load_config_file, parse_set, validate_config

    layers = [load_config_file(config_file) if config_file else {}, flags, parse_set(sets)]
    if resume is None:
        source = f"training configuration (--config {config_file} and flags)" if config_file else "training configuration"
        return build_config(*layers, source=source), None
    explicit: dict = {}
    for layer in layers:
        explicit = deep_update(explicit, layer)
    if resume == "last":
        out = Path(explicit.get("run", {}).get("out") or "")
        if not str(out) or out == Path("."):
            raise UserError("--resume without a checkpoint path needs --out RUN (the run directory to continue)",
                            hint="Example: hiposeg train --resume --out runs/synthetic-resnet18")
        path = out / "checkpoints" / "last.pt"
        if not path.exists():
            raise UserError(f"nothing to resume: {path} does not exist",
                            hint=f"Start the run without --resume, or check --out (given: {out}).")
    else:
        path = checkpoint.resolve(resume, prefer="last")
        if path.parent.name == "checkpoints" and not explicit.get("run", {}).get("out"):
            explicit.setdefault("run", {})["out"] = str(path.parent.parent)  # continue in that run directory
    saved = validate_config(checkpoint.load(path)["config"], source=f"configuration saved in {path}")
    resumed = validate_config(deep_update(saved.to_plain(), explicit), source=f"configuration resumed from {path}")
    movable = {"data.root", "data.dataset", "data.workers"}  # where the data lives, not what it is
    changed = [f"{sec}.{k}" for sec in ("data", "model", "loss", "optim")
               for k, v in getattr(resumed, sec).model_dump(mode="json").items()
               if getattr(saved, sec).model_dump(mode="json")[k] != v and f"{sec}.{k}" not in movable]
    if resumed.run.seed != saved.run.seed:  # the data order and augmentations are a function of it
        changed.append("run.seed")
    if changed:
        raise UserError(f"--resume continues the same experiment, but these settings differ from the checkpoint "
                        f"{path}: {', '.join(changed)}",
                        hint="Drop those flags to resume, or start a new run with a new --out.")
    return resumed, path


@app.command("train", no_args_is_help=False)
def train_cmd(
    dataset: Annotated[Optional[str], typer.Option(help=f"Dataset recipe: {DATASET_HELP}")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared dataset directory (default: data/DATASET).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/DATASET-BACKBONE).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML or JSON config file.")] = None,
    iters: Annotated[Optional[int], typer.Option(help="Training iterations.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Total batch over all processes.")] = None,
    crop: Annotated[Optional[str], typer.Option(help="Training crop HxW, e.g. 512x1024.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="resnet18, resnet50 or resnet101.")] = None,
    output_stride: Annotated[Optional[int], typer.Option("--output-stride", help="8 or 16.")] = None,
    pretrained: Annotated[Optional[Path], typer.Option(help="Local torchvision ResNet state-dict (.pth).")] = None,
    losses: Annotated[Optional[str], typer.Option(help="Loss terms, comma-separated subset of ce,fh,hh,fl,ll,align.")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="sequential (paper) or joint.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Base learning rate (poly decay).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    gpus: Annotated[Optional[int], typer.Option(help="Processes on this machine, one per GPU. Without GPUs, add "
                                                     "--device cpu to run N CPU processes (gloo backend).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cuda or cpu.")] = None,
    amp: Annotated[Optional[str], typer.Option(help="Mixed precision: off, bf16 or fp16 (fp16 uses a GradScaler).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Data loader workers per process.")] = None,
    resume: Annotated[Optional[str], typer.Option(
        help="Continue a run: bare --resume takes --out's checkpoints/last.pt; --resume PATH a checkpoint file "
             "or run directory.")] = None,
    ckpt_every: Annotated[Optional[int], typer.Option("--ckpt-every", help="Checkpoint every N iterations.")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Evaluate every N iterations (0: at the end).")] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic algorithms (bit-exact resume).")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="channels_last memory format.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any config field: --set loss.sigma1=0.1 "
                                                                   "(repeatable).")] = None,
) -> None:
    """Train DeepLabV3+ with the HiPoSeg branch, then evaluate every hierarchy level.

    With no dataset, trains on the built-in synthetic set (generated on the fly) with a CPU-sized
    recipe that finishes in a few minutes. Multi-GPU: `--gpus 4`, or under torchrun:
    `torchrun --nproc_per_node=4 -m hiposeg train --dataset cityscapes`.
    """
    from hiposeg.engine import fit

    flags = train_overrides(dataset=dataset, data=data, out=out, iters=iters, batch_size=batch_size, crop=crop,
                            backbone=backbone, output_stride=output_stride, pretrained=pretrained, losses=losses,
                            schedule=schedule, lr=lr, seed=seed, gpus=gpus, device=device, amp=amp, workers=workers,
                            ckpt_every=ckpt_every, eval_every=eval_every, deterministic=deterministic,
                            channels_last=channels_last, quiet=quiet)
    cfg, resume_path = resolve_train_config(config, flags, set_ or [], resume)
    if not cfg.run.quiet and os.environ.get("RANK", "0") == "0":
        default = dataset is None and data is None and config is None and resume is None
        note = " (the built-in default: no dataset given)" if default else ""
        err_console.print(Text.assemble(
            "hiposeg train: dataset ", (cfg.data.dataset, "bold"),
            f"{note}, {cfg.model.backbone} OS{cfg.model.output_stride}, {cfg.optim.iters} iters, batch "
            f"{cfg.optim.batch_size}, crop {cfg.data.crop[0]}x{cfg.data.crop[1]}, losses {','.join(cfg.loss.terms)} "
            f"({cfg.loss.schedule}), {cfg.run.gpus} process(es) -> {cfg.resolved_out()}"))
    result = fit(cfg, resume=resume_path)
    if not result.is_main:
        return
    if result.interrupted:
        err_console.print(Text(f"interrupted at iteration {result.iterations}; resume with "
                               f"`hiposeg train --resume --out {result.out}`"))
        raise typer.Exit(130)
    if result.report is not None:
        from hiposeg.report import print_report

        print_report(result.report, console)
    console.print(f"run directory: [bold]{escape(str(result.out))}[/bold]  (config.yaml, checkpoints/best.pt, "
                  "checkpoints/last.pt, metrics.jsonl, report.json)")


@app.command("eval")
def eval_cmd(
    model: Annotated[Optional[Path], typer.Argument(help="Run directory, checkpoint, or exported model file.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared dataset directory (default: the one the run used).")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val",
    report: Annotated[Optional[Path], typer.Option(help="Write report.json here (default: RUN/eval-SPLIT.json, "
                                                        "or print only).")] = None,
    predictions: Annotated[Optional[Path], typer.Option(help="Evaluate {stem}.png label maps from any tool "
                                                             "instead of a model (needs --data).")] = None,
    save_predictions: Annotated[Optional[Path], typer.Option("--save-predictions", help="Write fine-id PNGs here "
                                                                                          "(a new or empty folder).")] = None,
    mode: Annotated[str, typer.Option(help="auto (slide if larger than the training crop), whole or slide.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    amp: Annotated[str, typer.Option(help="off, bf16 or fp16.")] = "off",
    workers: Annotated[int, typer.Option(help="Data loader workers.")] = 2,
    which: Annotated[str, typer.Option("--checkpoint", help="For a run directory: best or last.")] = "best",
    invalid_gt: Annotated[str, typer.Option(
        "--invalid-gt", help="Ground-truth values that are neither a class nor ignore: error (name the files) or "
                             "ignore (leave them out of every score, count them in the report).")] = "error",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Allow --report to replace a file that is not a "
                                                                "hiposeg report, and --save-predictions to write into a "
                                                                "non-empty folder.")] = False,
) -> None:
    """Score a model (or another tool's predictions) on a prepared split at every hierarchy level."""
    from hiposeg.engine import evaluate, evaluate_predictions
    from hiposeg.metrics import INVALID_GT_POLICIES

    if mode not in ("auto", "whole", "slide"):
        raise UserError(f"--mode {mode!r} is not one of auto, whole, slide")
    if invalid_gt not in INVALID_GT_POLICIES:
        raise UserError(f"--invalid-gt {invalid_gt!r} is not one of {', '.join(INVALID_GT_POLICIES)}")
    if predictions is not None:
        if data is None:
            raise UserError("--predictions needs --data DATA (the prepared dataset holding the ground truth)")
        if save_predictions is not None:
            raise UserError("--save-predictions writes a model's predictions; with --predictions there is no model",
                            hint="Drop --save-predictions (the predictions are already in the --predictions folder).")
    elif model is None:
        raise UserError("give a run directory, checkpoint or exported model to evaluate (or --predictions DIR)")
    if report is None and predictions is None and Path(model).is_dir():  # type: ignore[arg-type]
        report = Path(model) / f"eval-{split}.json"  # type: ignore[arg-type]
    # every output is checked before the evaluation, whose result it must not lose
    if report is not None:
        check_report_path(report, overwrite=overwrite)
    if save_predictions is not None:
        from hiposeg.io import check_writable
        from hiposeg.predict import check_output_folder

        check_output_folder(save_predictions, "--save-predictions", overwrite=overwrite)
        check_writable(save_predictions, "--save-predictions")
    if predictions is not None:
        rep = evaluate_predictions(predictions, data, split, invalid_gt=invalid_gt)  # type: ignore[arg-type]
    else:
        from hiposeg.distributed import DistEnv, pick_device
        from hiposeg.export import load_inference_model

        dev = pick_device(device)
        loaded = load_inference_model(model, prefer=which, device=dev)  # type: ignore[arg-type]
        data_root = data or loaded.data_root
        if data_root is None:
            raise UserError(f"{model} does not record its dataset; pass --data DATA")
        if data is None and not (Path(data_root) / "manifest.json").exists():
            raise UserError(f"no prepared dataset at {os.path.abspath(data_root)}, the data recorded in {model}",
                            hint="Pass --data DIR with the folder the prepared dataset is in now.")
        from hiposeg.data.dataset import open_prepared

        h_data, _ = open_prepared(Path(data_root), split)
        if h_data.sha256 != loaded.hierarchy.sha256:
            raise UserError(f"{model} was trained with hierarchy {loaded.hierarchy.name!r} (sha256 "
                            f"{loaded.hierarchy.sha256[:12]}), but {data_root} uses {h_data.name!r} "
                            f"({h_data.sha256[:12]}): a different class tree",
                            hint="Evaluate on data prepared with the model's hierarchy.")
        rep = evaluate(loaded.module.to(dev), Path(data_root), split, DistEnv(device=dev), mode=mode,
                       crop=loaded.crop, amp=amp, mean=loaded.mean, std=loaded.std, workers=workers,
                       save_predictions=save_predictions, progress=True, invalid_gt=invalid_gt)
        rep["model"] = str(model)
    publish_report(rep, report)


def check_report_path(report: Path, *, overwrite: bool) -> None:
    """`--report FILE` before the evaluation: not inside a prepared dataset, not a folder, not a file
    of something else (unless --overwrite), and its folder writable."""
    from hiposeg.data.dataset import refuse_prepared_dataset
    from hiposeg.io import check_writable

    refuse_prepared_dataset(report, "--report")
    if report.is_dir():
        raise UserError(f"--report {report} is a folder; give the report's file name",
                        hint=f"Example: --report {report / 'report.json'}")
    if report.exists() and not overwrite and not is_hiposeg_report(report):
        raise UserError(f"--report {report} exists and is not a hiposeg report: it would be overwritten",
                        hint="Choose another file name, or add --overwrite to replace it.")
    check_writable(report.parent, "the folder of --report")


def is_hiposeg_report(path: Path) -> bool:
    """Whether `path` holds a report.json written by hiposeg (which a new evaluation may replace)."""
    from hiposeg.safeload import load_json

    try:
        if path.stat().st_size > 64 << 20:
            return False
        data = load_json(path.read_bytes(), str(path))
    except (OSError, UserError):
        return False
    return isinstance(data, dict) and isinstance(data.get("levels"), dict) and "hierarchy" in data


def publish_report(rep: dict, report: Optional[Path]) -> None:
    """Write report.json first, then print the tables. If the write fails, the finished evaluation is
    still printed in full (tables and JSON) before the error says where it could not be written."""
    from hiposeg.io import atomic_write_json, write_failure
    from hiposeg.report import print_report

    failure: Optional[str] = None
    if report is not None:
        try:
            atomic_write_json(report, rep)
        except OSError as e:
            failure = write_failure(e, report)
    print_report(rep, console)
    if report is None:
        return
    if failure is None:
        console.print(f"report written to [bold]{escape(str(report))}[/bold]")
        return
    sys.stdout.write(json.dumps(rep, indent=2) + "\n")
    raise UserError(f"could not write the report {failure}",
                    hint="The evaluation finished: its tables and its report.json content are printed above. Free "
                         "disk space or choose another --report to keep a file.")


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
    from hiposeg.data.prepare import UnknownPolicy

    return Annotated[UnknownPolicy, typer.Option(
        "--unknown", help="Raw label values the hierarchy does not list: stop with an error, or map them to ignore "
                          "(counted in manifest.json).")]


PrepUnknown = _prepare_unknown_option()


def _prepare_run(source: "Source", raw: Path, out: Optional[Path], dataset: str, *,  # noqa: F821
                 hierarchy: Optional[str], workers: Optional[int], limit: Optional[int], copy: bool, overwrite: bool,
                 unknown: str, skip_bad: bool, quiet: bool, ignore_unevaluated: bool = False) -> None:
    from hiposeg.data.prepare import prepare, print_summary

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
    from hiposeg.data.prepare import kept_note, print_summary
    from hiposeg.data.synthetic import generate

    made = generate(out, train=train, val=val, size=size, seed=seed, workers=workers, overwrite=overwrite, quiet=quiet)
    if made.reused:
        console.print(Text(f"{out} already holds this synthetic set (same settings): nothing to do"))
        print_summary(made.manifest, out, console)
        return
    print_summary({**made.manifest, "_run": {"notes": kept_note(out, made.kept)}}, out, console)


# ------------------------------------------------------------------------------------------
# hiposeg ablate | export | predict
# ------------------------------------------------------------------------------------------


@app.command("ablate")
def ablate_cmd(
    losses: Annotated[Optional[list[str]], typer.Option(
        help="A loss-term set, comma-separated (ce is always on); repeat for each configuration. If no set is ce "
             "alone, the ce-only baseline (the reference of the Δ columns) is added first. Default: the paper's "
             "Table 5 rows ce | ce,fh,hh | ce,fl,ll | ce,fh,hh,fl,ll | all.")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="Schedules to sweep, e.g. sequential,joint (Table 12).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="KEY=V1,V2 sweeps a field (Tables 10-11: --set loss.sigma1=0.1,0.25); KEY=V sets it for every "
                      "run. List-valued fields sweep bracketed values: --set loss.phases=[0,0,0],[0.1,0.2,0.3].")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Runs per configuration (seeds S..S+N-1); mean ± std.")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="First seed S (default: the config's run.seed, 0).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Ablation directory (default: runs/ablate-DATASET-BACKBONE).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the configurations and what a run would do; "
                                                            "train nothing.")] = False,
    dataset: Annotated[Optional[str], typer.Option(help=f"Dataset recipe: {DATASET_HELP}")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared dataset directory (default: data/DATASET).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML or JSON config file (base of every run).")] = None,
    iters: Annotated[Optional[int], typer.Option(help="Training iterations per run.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Total batch over all processes.")] = None,
    crop: Annotated[Optional[str], typer.Option(help="Training crop HxW, e.g. 512x1024.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="resnet18, resnet50 or resnet101.")] = None,
    output_stride: Annotated[Optional[int], typer.Option("--output-stride", help="8 or 16.")] = None,
    pretrained: Annotated[Optional[Path], typer.Option(help="Local torchvision ResNet state-dict (.pth).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Base learning rate (poly decay).")] = None,
    gpus: Annotated[Optional[int], typer.Option(help="Processes per run, one per GPU (with --device cpu: CPU "
                                                     "processes).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cuda or cpu.")] = None,
    amp: Annotated[Optional[str], typer.Option(help="Mixed precision: off, bf16 or fp16.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Data loader workers per process.")] = None,
    ckpt_every: Annotated[Optional[int], typer.Option("--ckpt-every", help="Checkpoint every N iterations.")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Evaluate every N iterations (0: at the end).")] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic algorithms.")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="channels_last memory format.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output (the results table still prints).")] = False,
) -> None:
    """Train one run per loss-term set (and schedule / --set sweep value, and seed) through the training
    engine, then tabulate fine and coarse mIoU beside the paper's Tables 5/6.

    Reruns of the same --out skip finished runs, resume interrupted ones and add new configurations.
    Results: OUT/results.md, OUT/results.csv, OUT/results.json.
    """
    from hiposeg import ablate

    flags = train_overrides(dataset=dataset, data=data, iters=iters, batch_size=batch_size, crop=crop, backbone=backbone,
                            output_stride=output_stride, pretrained=pretrained, lr=lr, gpus=gpus, device=device,
                            amp=amp, workers=workers, ckpt_every=ckpt_every, eval_every=eval_every,
                            deterministic=deterministic, channels_last=channels_last, quiet=quiet)
    plan = ablate.make_plan(config, flags, set_ or [], losses, schedule, seeds, seed, out)
    if dry_run:
        console.print(ablate.plan_table(plan))
        return
    results = ablate.run_ablation(plan, err_console, quiet=quiet)
    console.print(ablate.results_table(results))
    console.print(f"results: [bold]{escape(str(plan.out))}[/bold]/results.md, results.csv, results.json")
    if results["interrupted"]:
        err_console.print("interrupted; rerun the same command to continue (finished runs are skipped, the "
                          "interrupted one resumes)")
        raise typer.Exit(130)


@app.command("export")
def export_cmd(
    source: Annotated[Path, typer.Argument(help="Run directory, training checkpoint, or a hiposeg-format model "
                                                "(to convert it).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Model file to write.", show_default=False)],
    format_: Annotated[str, typer.Option("--format", help="hiposeg (plain-data .pt, default), torch-export (.pt2 "
                                                          "program, dynamic H/W) or onnx (needs hiposeg[onnx]).")] = "hiposeg",
    which: Annotated[str, typer.Option("--checkpoint", help="For a run directory: best or last.")] = "best",
) -> None:
    """Write an inference-only model: DeepLabV3+ weights + hierarchy, palette, pi and normalisation, with no
    projection head, prototype memory or optimizer. Reloads it and checks its logits against the training model."""
    from hiposeg.export import export_model

    s = export_model(source, out, fmt=format_, prefer=which)
    console.print(f"wrote [bold]{escape(str(s.out))}[/bold] ({s.format}, {s.file_bytes / 2**20:.1f} MiB)")
    console.print(f"parameters: {s.parameters:,} exported = {s.plain_parameters:,} in a plain DeepLabV3+ "
                  f"({s.parameters / s.plain_parameters:.2f}x); the training model had {s.training_parameters:,} "
                  f"(+{s.training_parameters - s.parameters:,} projection head) and {s.memory_values:,} prototype "
                  "memory values, none exported")
    console.print(f"check: max |exported - training| logit difference {s.max_abs_diff:.3g} on a random "
                  f"{'x'.join(map(str, s.check_shape))} batch (tolerance {s.tolerance:.3g}; {s.checked_with})")


@app.command("predict")
def predict_cmd(
    model: Annotated[Path, typer.Argument(help="Exported model (any format), run directory or checkpoint.",
                                          show_default=False)],
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or quoted globs.",
                                                show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder: fine/, coarse/, overlay/ PNGs.",
                                      show_default=False)],
    mode: Annotated[str, typer.Option(help="auto (sliding windows of the training crop for larger images), whole "
                                           "or slide.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch (equal sizes are grouped).")] = 4,
    overlay: Annotated[str, typer.Option(help="Colour overlays: fine, coarse (overlay-coarse/), both or none.")] = "fine",
    alpha: Annotated[float, typer.Option(help="Overlay opacity of the palette colours.")] = 0.5,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    workers: Annotated[int, typer.Option(min=0, help="Image decoding workers.")] = 2,
    which: Annotated[str, typer.Option("--checkpoint", help="For a run directory: best or last.")] = "best",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --out, replacing files of the "
                                                                "same names.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Segment images: fine ids (OUT/fine), coarse ids through the hierarchy (OUT/coarse), colour overlays.

    --out must lie outside every prepared dataset and contain none of the inputs, and must be new or
    empty unless --overwrite is given."""
    from hiposeg.distributed import pick_device
    from hiposeg.export import load_inference_model
    from hiposeg.predict import predict

    dev = pick_device(device)
    loaded = load_inference_model(model, prefer=which, device=dev)
    s = predict(loaded, inputs, out, mode=mode, batch_size=batch_size, overlay=overlay, alpha=alpha,  # type: ignore[arg-type]
                workers=workers, device=dev, progress=not quiet, overwrite=overwrite)
    folders = {"fine": "overlay/", "coarse": "overlay-coarse/", "both": "overlay/, overlay-coarse/", "none": ""}
    console.print(f"{s.images} image(s) in {s.seconds:.1f} s -> [bold]{escape(str(out))}[/bold] "
                  f"(fine/, coarse/{', ' + folders[overlay] if folders[overlay] else ''})")


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning `UserError` into one message + exit 2."""
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=argv, standalone_mode=True)
    except UserError as e:  # pragma: no cover - exercised through run_cli in tests
        _print_user_error(e)
        sys.exit(2)


def normalize_argv(argv: list[str]) -> list[str]:
    """A bare `--resume` (no value, or followed by another option) means `--resume last`."""
    out: list[str] = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("last")
    return out


def _print_user_error(e: UserError) -> None:
    message = e.message
    # A UserError raised in a DataLoader worker arrives re-created around the worker's traceback
    # text ("Caught UserError in DataLoader worker process 0. Original Traceback ..."): show only
    # the original message.
    marker = "hiposeg.errors.UserError: "
    if message.startswith("Caught UserError") and marker in message:
        message = message.rsplit(marker, 1)[1].strip()
    err_console.print(Text("error: ", style="bold red") + Text(message))
    if e.hint:
        err_console.print(Text(e.hint, style="yellow"))


# Typer runs commands inside click's standalone mode, which would print a traceback for our
# exceptions. Wrap every command so a UserError becomes a clean exit 2 (CliRunner sees it too).
def _install_user_error_handler(typer_app: typer.Typer) -> None:
    import functools

    for info in typer_app.registered_commands:
        cb = info.callback
        if cb is None or getattr(cb, "_hiposeg_wrapped", False):
            continue

        @functools.wraps(cb)
        def wrapped(*args, __cb=cb, **kwargs):  # type: ignore[no-untyped-def]
            try:
                return __cb(*args, **kwargs)
            except UserError as e:
                _print_user_error(e)
                raise typer.Exit(2) from None

        wrapped._hiposeg_wrapped = True  # type: ignore[attr-defined]
        info.callback = wrapped
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _install_user_error_handler(group.typer_instance)


_install_user_error_handler(app)
