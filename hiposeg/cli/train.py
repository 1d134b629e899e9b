"""`hiposeg train` and `hiposeg ablate`: flags -> a validated training config -> the one engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.text import Text

from hiposeg.cli.app import app, console, err_console
from hiposeg.config import LOSS_TERMS
from hiposeg.errors import UserError


# ------------------------------------------------------------------------------------------
# The training options both commands take (one definition each)
# ------------------------------------------------------------------------------------------

DATASET_HELP = "cityscapes, ade20k, mapillary, pascal-part or synthetic (the built-in default)."
TERMS = ",".join(LOSS_TERMS)
Dataset = Annotated[Optional[str], typer.Option(help=f"Dataset recipe: {DATASET_HELP}")]
Data = Annotated[Optional[Path], typer.Option(help="Prepared dataset directory (default: data/DATASET).")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Total batch over all processes.")]
Crop = Annotated[Optional[str], typer.Option(help="Training crop HxW, e.g. 512x1024.")]
FAMILIES_HELP = "deeplabv3plus (default), hrnet, segformer, fpn or unet (all but deeplabv3plus: pip install 'hiposeg[models]')"
# escape: Rich would read "[models]" as markup and print "pip install 'hiposeg'"
Model = Annotated[Optional[str], typer.Option("--model", help=escape(f"Model family: {FAMILIES_HELP}."))]
Backbone = Annotated[Optional[str], typer.Option(help=(
    "The family's variant: resnet18/50/101 (deeplabv3plus), hrnet_w18_small ... hrnet_w48, hrnet_w64 (hrnet), "
    "mit_b0 ... mit_b5 (segformer), resnet18/34/50/101 or efficientnet-b0 ... b7 (fpn, unet). Default: the "
    "family's smallest on the synthetic set, its paper-scale one otherwise."))]
OutputStride = Annotated[Optional[int], typer.Option("--output-stride", help="8 or 16 (deeplabv3plus).")]
Pretrained = Annotated[Optional[str], typer.Option(help=(
    "Backbone weights: imagenet (the library's ImageNet weights, downloaded once into its cache; the default of "
    "the paper recipes), a local weights file, or none."))]
Lr = Annotated[Optional[float], typer.Option(help="Base learning rate (poly decay).")]
Device = Annotated[Optional[str], typer.Option(help="auto, cuda or cpu.")]
Workers = Annotated[Optional[int], typer.Option(min=0, help="Data loader workers per process.")]
CkptEvery = Annotated[Optional[int], typer.Option("--ckpt-every", min=1, help="Checkpoint every N iterations.")]
EvalEvery = Annotated[Optional[int], typer.Option("--eval-every", min=0,
                                                  help="Evaluate every N iterations (0: at the end).")]
ChannelsLast = Annotated[bool, typer.Option("--channels-last", help="channels_last memory format.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the network (eager, with one warning, where "
                                                         "no compiler backend is available).")]

# Where each flag goes in the configuration (None: not given). `ablate` takes all but TRAIN_ONLY_FLAGS:
# its --out, --seed, --losses, --schedule and --model mean the ablation's directory, first seed and sweeps.
FLAG_FIELDS = {
    "dataset": ("data", "dataset"), "data": ("data", "root"), "crop": ("data", "crop"), "workers": ("data", "workers"),
    "model": ("model", "name"), "backbone": ("model", "backbone"), "pretrained": ("model", "pretrained"),
    "output_stride": ("model", "output_stride"), "iters": ("optim", "iters"), "batch_size": ("optim", "batch_size"),
    "lr": ("optim", "lr"), "gpus": ("run", "gpus"), "device": ("run", "device"), "amp": ("run", "amp"),
    "ckpt_every": ("run", "ckpt_every"), "eval_every": ("run", "eval_every"),
    "deterministic": ("run", "deterministic"), "channels_last": ("run", "channels_last"),
    "compile_": ("run", "compile"), "quiet": ("run", "quiet"),
    "out": ("run", "out"), "seed": ("run", "seed"), "losses": ("loss", "terms"), "schedule": ("loss", "schedule"),
}
TRAIN_ONLY_FLAGS = ("out", "seed", "losses", "schedule", "model")
BOOL_FLAGS = ("deterministic", "channels_last", "compile_", "quiet")  # on/off switches: off = not given


def parse_crop(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().replace("×", "x").split("x"))
    except ValueError:
        raise UserError(f"--crop {value!r} is not of the form HxW", hint="Example: --crop 512x1024") from None
    return h, w


def train_overrides(params: dict, skip: tuple[str, ...] = ()) -> dict:
    """Nested config overrides from the command's flags that were actually given (None = not given)."""
    out: dict = {}
    for name, (section, key) in FLAG_FIELDS.items():
        value = params.get(name)
        if name in skip or value is None or value is False and name in BOOL_FLAGS:
            continue
        if name == "crop":
            value = parse_crop(str(value))
        if isinstance(value, Path):
            value = str(value)
        out.setdefault(section, {})[key] = value
    if "root" in out.get("data", {}) and "dataset" not in out["data"]:
        out["data"]["dataset"] = "custom"
    return out


def processes(world: int, launcher: str) -> str:
    """`1 process`, `2 processes (--gpus 2)`, `8 processes (torchrun)`: what the header says."""
    how = {"spawn": f" (--gpus {world})", "torchrun": " (torchrun)"}.get(launcher, "")
    return f"{world} process{'es' if world > 1 else ''}{how}"


def model_line(cfg) -> str:
    """The model as the start line shows it: `resnet18 OS16` (DeepLabV3+) or `hrnet hrnet_w18_small`,
    and where its weights come from."""
    m = cfg.model
    arch = f"{m.backbone} OS{m.output_stride}" if m.name == "deeplabv3plus" else f"{m.name} {m.backbone}"
    return f"{arch} ({'random init' if m.pretrained is None else f'pretrained: {m.pretrained}'})"


# ------------------------------------------------------------------------------------------
# hiposeg train
# ------------------------------------------------------------------------------------------


@app.command("train", no_args_is_help=False)
def train_cmd(
    ctx: typer.Context,
    dataset: Dataset = None,
    data: Data = None,
    out: Annotated[Optional[Path], typer.Option(help=(
        "Run directory (default: runs/DATASET-BACKBONE, runs/DATASET-FAMILY-BACKBONE for a family other than "
        "deeplabv3plus)."))] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML or JSON config file.")] = None,
    iters: Annotated[Optional[int], typer.Option(min=1, help="Training iterations.")] = None,
    batch_size: BatchSize = None,
    crop: Crop = None,
    model: Model = None,
    backbone: Backbone = None,
    output_stride: OutputStride = None,
    pretrained: Pretrained = None,
    losses: Annotated[Optional[str], typer.Option(help=f"Loss terms, comma-separated subset of {TERMS}.")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="sequential (paper) or joint.")] = None,
    lr: Lr = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    gpus: Annotated[Optional[int], typer.Option(min=1, help="Processes on this machine, one per GPU. Without GPUs, add "
                                                     "--device cpu to run N CPU processes (gloo backend).")] = None,
    device: Device = None,
    amp: Annotated[Optional[str], typer.Option(help="Mixed precision: off, bf16 or fp16 (fp16 uses a GradScaler).")] = None,
    workers: Workers = None,
    resume: Annotated[Optional[str], typer.Option(
        help="Continue a run: bare --resume takes --out's checkpoints/last.pt; --resume PATH a checkpoint file "
             "or run directory.")] = None,
    ckpt_every: CkptEvery = None,
    eval_every: EvalEvery = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic algorithms (bit-exact resume).")] = False,
    channels_last: ChannelsLast = False,
    compile_: Compile = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any config field: --set loss.sigma1=0.1 "
                                                                   "(repeatable).")] = None,
) -> None:
    """Train a segmenter (DeepLabV3+ by default) with the HiPoSeg branch, then evaluate every hierarchy level.

    With no dataset, trains on the built-in synthetic set (generated on the fly) with a CPU-sized
    recipe (ResNet-18, 400 iterations at 128x128). Multi-GPU: `--gpus 4`, or under torchrun:
    `torchrun --nproc_per_node=4 -m hiposeg train --dataset cityscapes`.
    """
    from hiposeg.engine import as_launched, fit
    from hiposeg.rundir import checkpoint_path, resolve_train_config, resume_command

    cfg, resume_path = resolve_train_config(config, train_overrides(ctx.params), set_ or [], resume)
    launched = as_launched(cfg.with_absolute_paths()).run  # as the run will record it
    if not cfg.run.quiet and os.environ.get("RANK", "0") == "0":
        default = dataset is None and data is None and config is None and resume is None
        note = " (the built-in default: no dataset given)" if default else ""
        err_console.print(Text.assemble(
            "hiposeg train: dataset ", (cfg.data.dataset, "bold"),
            f"{note}, {model_line(cfg)}, {cfg.optim.iters} iters, batch "
            f"{cfg.optim.batch_size}, crop {cfg.data.crop[0]}x{cfg.data.crop[1]}, losses {','.join(cfg.loss.terms)} "
            f"({cfg.loss.schedule}), {processes(launched.gpus, launched.launcher)} -> {launched.out}"))
    result = fit(cfg, resume=resume_path)
    if not result.is_main:
        return
    if result.interrupted:
        err_console.print(Text(f"interrupted at iteration {result.iterations}; checkpoint written to "
                               f"{checkpoint_path(result.out)}; resume with "
                               f"{resume_command(result.out, launched.launcher)}"))
        raise typer.Exit(130)
    if result.report is not None:
        from hiposeg.report import print_report

        print_report(result.report, console)
    console.print(f"run directory: [bold]{escape(str(result.out))}[/bold]  (config.yaml, checkpoints/best.pt, "
                  "checkpoints/last.pt, metrics.jsonl, report.json)")


# ------------------------------------------------------------------------------------------
# hiposeg ablate
# ------------------------------------------------------------------------------------------


@app.command("ablate")
def ablate_cmd(
    ctx: typer.Context,
    losses: Annotated[Optional[list[str]], typer.Option(
        help="A loss-term set, comma-separated (ce is always on); repeat for each configuration. If no set is ce "
             "alone, the ce-only baseline (the reference of the Δ columns) is added first. Default: the paper's "
             "Table 5 rows ce | ce,fh,hh | ce,fl,ll | ce,fh,hh,fl,ll | all.")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="Schedules to sweep, e.g. sequential,joint (Table 12).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="KEY=V1,V2 sweeps a field (Tables 10-11: --set loss.sigma1=0.1,0.25); KEY=V sets it for every "
                      "run. List-valued fields sweep bracketed values: --set loss.phases=[0,0,0],[0.1,0.2,0.3].")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help=(
        "Model families to sweep, comma-separated, each optionally FAMILY:VARIANT, e.g. deeplabv3plus,hrnet,segformer "
        "(Table 9; each at its default variant for the recipe) or hrnet:hrnet_w48,segformer:mit_b5. One family: "
        "every run uses it."))] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Runs per configuration (seeds S..S+N-1); mean ± std.")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="First seed S (default: the config's run.seed, 0).")] = None,
    out: Annotated[Optional[Path], typer.Option(help=(
        "Ablation directory (default: runs/ablate-DATASET-BACKBONE, runs/ablate-DATASET-models for a --model sweep)."))] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the configurations and what a run would do; "
                                                            "train nothing.")] = False,
    dataset: Dataset = None,
    data: Data = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML or JSON config file (base of every run).")] = None,
    iters: Annotated[Optional[int], typer.Option(min=1, help="Training iterations per run.")] = None,
    batch_size: BatchSize = None,
    crop: Crop = None,
    backbone: Backbone = None,
    output_stride: OutputStride = None,
    pretrained: Pretrained = None,
    lr: Lr = None,
    gpus: Annotated[Optional[int], typer.Option(min=1, help="Processes per run, one per GPU (with --device cpu: CPU "
                                                     "processes).")] = None,
    device: Device = None,
    amp: Annotated[Optional[str], typer.Option(help="Mixed precision: off, bf16 or fp16.")] = None,
    workers: Workers = None,
    ckpt_every: CkptEvery = None,
    eval_every: EvalEvery = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic algorithms.")] = False,
    channels_last: ChannelsLast = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output (the results table still prints).")] = False,
) -> None:
    """Train one run per loss-term set (and schedule / model family / --set sweep value, and seed) through the
    training engine, then tabulate fine and coarse mIoU beside the paper's Tables 5/6/9.

    Reruns of the same --out skip finished runs, resume interrupted ones and add new configurations.
    Results: OUT/results.md, OUT/results.csv, OUT/results.json.
    """
    from hiposeg import ablate

    flags = train_overrides(ctx.params, skip=TRAIN_ONLY_FLAGS)
    plan = ablate.make_plan(config, flags, set_ or [], losses, schedule, seeds, seed, out, models=model)
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
