"""`hiposeg plot`: the paper's pictures and an HTML page from run directories (and an ablation).

Named `plot`, not `report`: `report` already means report.json (what `eval --report` writes and every
run holds) and hiposeg/report.py's tables; this command draws pictures (and a page showing them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.text import Text

from hiposeg.cli.app import app, console, err_console
from hiposeg.errors import UserError


PLOT_HELP = ("Draw the paper's pictures for a run (against a baseline run) and write one self-contained HTML page."
             "\n\nTraining curves, per-class IoU at every level, mIoU per level, the feature-space map (t-SNE), the "
             "prototype geometry, confusion matrices, a qualitative gallery and the ablation chart, with the numbers "
             "behind them in numbers.json. Needs the plots extra: pip install 'hiposeg\\[plots]'.")


@app.command("plot", help=PLOT_HELP)
def plot_cmd(
    runs: Annotated[Optional[list[Path]], typer.Argument(
        help="Run directories: the first is the run the pictures are about; every one is overlaid in the training "
             "curves and compared in the mIoU and ablation charts.", show_default=False)] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="Baseline run directory (e.g. the CE-only run, or the CE "
                                                          "row of an ablation: ABL/runs/losses=ce/seed-0).")] = None,
    ablation: Annotated[Optional[Path], typer.Option(help="`hiposeg ablate` output folder: its results.json is "
                                                          "charted (otherwise the runs given are).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: RUN/plots).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared dataset (default: the one the run used).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to read (default: the run's validation split).")] = None,
    which: Annotated[str, typer.Option("--checkpoint", help="last (the model report.json scores) or best.")] = "last",
    pixels_per_class: Annotated[int, typer.Option("--pixels-per-class", min=1, help="Feature-map pixels sampled per "
                                                                                    "fine class.")] = 200,
    images: Annotated[int, typer.Option(min=1, help="At most this many images of the split (evenly spaced) for "
                                                    "the feature map, geometry and gallery.")] = 100,
    embedding: Annotated[str, typer.Option(help="tsne (the paper's), pca, or umap (needs umap-learn).")] = "tsne",
    seed: Annotated[int, typer.Option(help="Seed of the pixel sampling and the embedding.")] = 0,
    gallery: Annotated[int, typer.Option(min=1, help="Gallery: this many largest improvements and as many largest "
                                                     "regressions.")] = 3,
    show: Annotated[Optional[list[str]], typer.Option(help="Gallery images by stem instead (repeatable).")] = None,
    svg: Annotated[bool, typer.Option("--svg/--no-svg", help="Also write SVG of the line and bar charts.")] = True,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --out that `hiposeg plot` "
                                                                "did not write (files of the same names are "
                                                                "replaced, others left alone).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only where the page is.")] = False,
) -> None:
    """Draw the paper's pictures for a run (against a baseline run) and write one HTML page (PLOT_HELP)."""
    from hiposeg.distributed import pick_device
    from hiposeg.plots.build import PlotOptions, make_plots
    from hiposeg.plots.embed import EMBEDDINGS

    if which not in ("best", "last"):
        raise UserError(f"--checkpoint {which!r} is not best or last")
    if embedding not in EMBEDDINGS:
        raise UserError(f"--embedding {embedding!r} is not one of {', '.join(EMBEDDINGS)}")
    opts = PlotOptions(out=out, data=data, split=split, which=which, pixels_per_class=pixels_per_class, images=images,
                       embedding=embedding, seed=seed, gallery=gallery, show=list(show or []), svg=svg,
                       device=pick_device(device), overwrite=overwrite)

    def say(line: str) -> None:
        if not quiet:
            err_console.print(Text(line, style="dim"), highlight=False)

    s = make_plots(list(runs or []), baseline, ablation, opts, say)
    for name, why in s.skipped.items():
        err_console.print(Text(f"not drawn: {name}: {why}", style="yellow"), highlight=False)
    console.print(f"{len(s.pictures)} picture(s) in {s.seconds:.1f} s -> [bold]{escape(str(s.page))}[/bold]")
