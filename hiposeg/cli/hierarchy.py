"""`hiposeg hierarchy show | validate`: inspect and check label hierarchy files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text
from rich.tree import Tree

from hiposeg.cli.app import app, console
from hiposeg.data.registry import builtin_hierarchy_names


# ------------------------------------------------------------------------------------------
# hiposeg hierarchy show | validate
# ------------------------------------------------------------------------------------------

hierarchy_app = typer.Typer(help="Inspect and validate label hierarchy files.", no_args_is_help=True)
app.add_typer(hierarchy_app, name="hierarchy")


def _swatch(rgb: tuple[int, int, int]) -> Text:
    return Text("  ", style=f"on rgb({rgb[0]},{rgb[1]},{rgb[2]})")


@hierarchy_app.command("show")
def hierarchy_show(
    name: Annotated[str, typer.Argument(help=f"Built-in name ({', '.join(builtin_hierarchy_names())}) or a path to "
                                             "a JSON file.")],
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

    h = Hierarchy.from_file(file, allow_pipe=True)  # named here, so `validate <(...)` works
    console.print(Text.assemble(("valid", "green"), f": {file} — {h.name}: {h.summary()} "
                                f"(train fine={h.fine_level!r}, coarse={h.coarse_level!r})"))
