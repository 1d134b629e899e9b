"""The Typer app, the console-script entry point and the one place a `UserError` becomes a message.

Each command module (`hierarchy`, `prepare`, `train`, `infer`) registers its commands on `app`;
`hiposeg.cli` imports them all and then wraps every command so that a user mistake is printed as one
clear message with exit code 2 (no traceback).
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

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
    """hiposeg: a segmentation model (DeepLabV3+, HRNet, SegFormer, ...) with a training-only hierarchical
    prototype branch."""


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


