"""The `hiposeg` command line: each command parses its flags, builds a validated config and calls
one function. User mistakes (`UserError`) are printed as one clear message with exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
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
    console.print(f"[green]valid[/green]: {file} — {h.name}: {h.summary()} "
                  f"(train fine={h.fine_level!r}, coarse={h.coarse_level!r})")


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning `UserError` into one message + exit 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as e:  # pragma: no cover - exercised through run_cli in tests
        _print_user_error(e)
        sys.exit(2)


def _print_user_error(e: UserError) -> None:
    err_console.print(Text("error: ", style="bold red") + Text(e.message))
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
