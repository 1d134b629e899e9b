"""`hiposeg prepare SOURCE RAW`: one sub-command per dataset source, plus `synthetic`.

The source sub-commands are built from `hiposeg.data.registry.SOURCES`: a source's docstring is
its help and its `flags` (`hiposeg.data.options.Flag`) its options, so adding a converter changes
nothing here. `synthetic` generates the built-in set instead of converting a release.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from hiposeg.cli.app import app, console
from hiposeg.data.options import OVERWRITE, QUIET, WORKERS, Flag
from hiposeg.data.registry import SOURCES
from hiposeg.data.sources import Source

prepare_app = typer.Typer(
    help="Convert a raw release (or your own images + masks) into a prepared dataset: images, fine and coarse "
         "label maps, manifest.json. Reruns resume; RAW is never modified.",
    no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")

PrepRaw = Annotated[Path, typer.Argument(help="Folder of the raw release (read only).", show_default=False)]


def typer_option(flag: Flag) -> Any:
    """The Typer annotation of a declared flag."""
    return Annotated[flag.type, typer.Option(*flag.decls, help=flag.help, min=flag.min,
                                             show_default=flag.show_default)]


def parameter(flag: Flag) -> inspect.Parameter:
    """A flag as a keyword parameter of a command's callback (no default: required)."""
    default = inspect.Parameter.empty if flag.required else flag.default
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=typer_option(flag))


def add_source_command(source_cls: type[Source], group: typer.Typer = prepare_app) -> None:
    """Register `hiposeg prepare NAME RAW [flags]` (in `group`): the flags go to the source's
    constructor or to `prepare()`, as each declares; the summary table is printed at the end."""

    def run(raw: Path, **values: Any) -> None:
        from hiposeg.data.manifest import print_summary
        from hiposeg.data.prepare import prepare

        source = source_cls(**{f.name: values.pop(f.name) for f in source_cls.flags if f.target == "source"})
        out = values.pop("out") or source.default_out(raw)
        manifest = prepare(source, raw, out, **values)
        print_summary(manifest, out, console)

    raw = inspect.Parameter("raw", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=PrepRaw)
    run.__signature__ = inspect.Signature([raw, *map(parameter, source_cls.flags)])  # type: ignore[attr-defined]
    group.command(source_cls.name, help=source_cls.__doc__)(run)


for _source in SOURCES.values():
    add_source_command(_source)


PrepWorkers = typer_option(WORKERS)
PrepOverwrite = typer_option(OVERWRITE)
PrepQuiet = typer_option(QUIET)


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
