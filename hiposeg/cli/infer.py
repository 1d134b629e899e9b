"""`hiposeg eval`, `hiposeg export` and `hiposeg predict`: the inference side of the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from hiposeg.cli.app import app, console
from hiposeg.errors import UserError


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
    workers: Annotated[int, typer.Option(min=0, help="Data loader workers.")] = 2,
    which: Annotated[str, typer.Option("--checkpoint", help="For a run directory: best or last.")] = "best",
    invalid_gt: Annotated[str, typer.Option(
        "--invalid-gt", help="Ground-truth values that are neither a class nor ignore: error (name the files) or "
                             "ignore (leave them out of every score, count them in the report).")] = "error",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Allow --report to replace a file that is not a "
                                                                "hiposeg report, and --save-predictions to write into a "
                                                                "non-empty folder.")] = False,
) -> None:
    """Score a model (or another tool's predictions) on a prepared split at every hierarchy level."""
    from hiposeg.evaluate import eval_dataset, eval_loader, evaluate, evaluate_predictions
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
        check_report_in_run(report, model, overwrite=overwrite)
    if save_predictions is not None:  # then, once the split is known, its images (`check_predictions_folder`)
        from hiposeg.predict import check_output_folder

        check_output_folder(save_predictions, "--save-predictions", overwrite=overwrite)
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
        from hiposeg.data.dataset import moved_dataset_error, open_prepared

        if data is None and not (Path(data_root) / "manifest.json").exists():
            raise moved_dataset_error(Path(data_root), f"the data recorded in {model}")

        h_data, _ = open_prepared(Path(data_root), split)
        if h_data.sha256 != loaded.hierarchy.sha256:
            raise UserError(f"{model} was trained with hierarchy {loaded.hierarchy.name!r} (sha256 "
                            f"{loaded.hierarchy.sha256[:12]}), but {data_root} uses {h_data.name!r} "
                            f"({h_data.sha256[:12]}): a different class tree",
                            hint="Evaluate on data prepared with the model's hierarchy.")
        env = DistEnv(device=dev)
        val = eval_dataset(Path(data_root), split, loaded.mean, loaded.std)
        if save_predictions is not None:
            check_predictions_folder(save_predictions, Path(data_root) / split / "images")
        if hasattr(loaded.module, "check_size"):  # an exported program: its input limits, before any output
            from hiposeg.inference import check_input_sizes
            from hiposeg.predict import probe_sizes

            files = val.image_files()
            sizes = list(zip(files, probe_sizes(files)))
            check_input_sizes(loaded.module, sizes, mode, loaded.crop, batch_size=1)  # type: ignore[arg-type]
        loader = eval_loader(val, env, workers=workers)
        rep = evaluate(loaded.module.to(dev), loader, env, mode=mode, crop=loaded.crop, amp=amp,
                       save_predictions=save_predictions, progress=True, invalid_gt=invalid_gt)
        rep["model"] = str(model)
    publish_report(rep, report)


def check_predictions_folder(folder: Path, images: Path) -> None:
    """--save-predictions, before any is written: never over the images evaluated (nor the raw files
    the dataset's images link to), and writable."""
    from hiposeg.atomic import check_writable
    from hiposeg.predict import refuse_outputs_over_inputs

    refuse_outputs_over_inputs([folder], sorted(images.iterdir()), "--save-predictions")
    check_writable(folder, "--save-predictions")


def check_report_path(report: Path, *, overwrite: bool) -> None:
    """`--report FILE` before the evaluation: not inside a prepared dataset, not a folder, not a file
    of something else (unless --overwrite), and its folder writable."""
    from hiposeg.data.dataset import refuse_prepared_dataset
    from hiposeg.atomic import check_writable

    refuse_prepared_dataset(report, "--report")
    if report.is_dir():
        raise UserError(f"--report {report} is a folder; give the report's file name",
                        hint=f"Example: --report {report / 'report.json'}")
    if report.exists() and not overwrite and not is_hiposeg_report(report):
        raise UserError(f"--report {report} exists and is not a hiposeg report: it would be overwritten",
                        hint="Choose another file name, or add --overwrite to replace it.")
    check_writable(report.parent, "the folder of --report")


def check_report_in_run(report: Path, model: Optional[Path], *, overwrite: bool) -> None:
    """A report inside a run directory is written only by an evaluation of that run's own model, and
    never over the run's training report (report.json, which `ablate` tabulates), unless --overwrite."""
    from hiposeg.rundir import REPORT_FILE, enclosing_run

    run = None if overwrite else enclosing_run(report)
    if run is None:
        return
    hint = "Write the report elsewhere (`eval RUN` writes RUN/eval-SPLIT.json), or add --overwrite."
    if model is None or not (Path(model).resolve() == run or run in Path(model).resolve().parents):
        raise UserError(f"--report {report} is inside the run directory {run}, but the model evaluated "
                        f"({model or 'none: --predictions'}) is not that run's: it would replace the run's files",
                        hint=hint)
    if report.name == REPORT_FILE and report.resolve().parent == run:
        raise UserError(f"--report {report} is the training report of the run {run} (`ablate` tabulates it): eval "
                        "does not replace it", hint=hint)


def is_hiposeg_report(path: Path) -> bool:
    """Whether `path` holds a report.json written by hiposeg (which a new evaluation may replace)."""
    from hiposeg.rundir import read_json

    try:
        data = read_json(path)
    except UserError:
        return False
    return isinstance(data, dict) and isinstance(data.get("levels"), dict) and "hierarchy" in data


def publish_report(rep: dict, report: Optional[Path]) -> None:
    """Write report.json first, then print the tables. If the write fails, the finished evaluation is
    still printed in full (tables and JSON) before the error says where it could not be written."""
    from hiposeg.atomic import atomic_write_json, write_failure
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


@app.command("export")
def export_cmd(
    source: Annotated[Path, typer.Argument(help="Run directory, training checkpoint, or a hiposeg-format model "
                                                "(to convert it).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Model file to write.", show_default=False)],
    format_: Annotated[str, typer.Option("--format", help="hiposeg (plain-data .pt, default), torch-export (.pt2 "
                                                          "program, dynamic H/W) or onnx (needs hiposeg[onnx]).")] = "hiposeg",
    which: Annotated[str, typer.Option("--checkpoint", help="For a run directory: best or last.")] = "best",
) -> None:
    """Write an inference-only model: the segmenter's weights + hierarchy, palette, pi and normalisation, with no
    projection head, auxiliary head, prototype memory or optimizer. Reloads it and checks its logits against the
    training model."""
    from hiposeg.export import export_model

    s = export_model(source, out, fmt=format_, prefer=which)
    console.print(f"wrote [bold]{escape(str(s.out))}[/bold] ({s.format}, {s.file_bytes / 2**20:.1f} MiB)")
    left_out = {name: n for name, n in s.head_parameters.items() if n} or {"projection head": 0}
    heads = ", ".join(f"+{n:,} {name}" for name, n in left_out.items())
    console.print(f"parameters: {s.parameters:,} exported = {s.plain_parameters:,} in a plain {s.model} "
                  f"({s.parameters / s.plain_parameters:.2f}x); the training model had {s.training_parameters:,} "
                  f"({heads}) and {s.memory_values:,} prototype memory values, none exported")
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
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch (equal sizes are grouped).")] = 4,
    overlay: Annotated[str, typer.Option(help="Colour overlays: fine, coarse (overlay-coarse/), both or none.")] = "fine",
    alpha: Annotated[float, typer.Option(help="Overlay opacity of the palette colours.")] = 0.5,
    palette: Annotated[str, typer.Option(help="Overlay colours: hierarchy (the hierarchy file's) or families (a "
                                              "parent's children share a hue family; colour-blind-safe).")] = "hierarchy",
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    workers: Annotated[int, typer.Option(min=0, help="Image decoding workers.")] = 2,
    which: Annotated[str, typer.Option("--checkpoint", help="For a run directory: best or last.")] = "best",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --out, replacing files of the "
                                                                "same names.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model (eager, with one warning, where "
                                                             "no compiler backend is available).")] = False,
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
                workers=workers, device=dev, progress=not quiet, overwrite=overwrite, compile_model=compile_,
                palette=palette)
    folders = {"fine": "overlay/", "coarse": "overlay-coarse/", "both": "overlay/, overlay-coarse/", "none": ""}
    console.print(f"{s.images} image(s) in {s.seconds:.1f} s -> [bold]{escape(str(out))}[/bold] "
                  f"(fine/, coarse/{', ' + folders[overlay] if folders[overlay] else ''})")
